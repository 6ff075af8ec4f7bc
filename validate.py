#!/usr/bin/env python3
"""timm-adv validation: timm's validate.py flags plus clean and adversarial (FGSM / PGD) accuracy.

    python validate.py --model resnet10t --checkpoint output/train/run/model_best.pth.tar \\
        --attack pgd --eps 0.1 --steps 20

Models load by name (with ``--pretrained``), from ``hf-hub:org/name`` or ``local-dir:/path``, and
from any timm or timm-adv training checkpoint (``--checkpoint``). Without ``--data-dir`` /
``--dataset`` the bundled offline dataset ``bundled/mnist`` (validation split) is used.
"""
import argparse
import csv
import json
import logging
import os
import sys
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial

import torch
from timm import utils
from timm.data import create_loader, resolve_data_config
from timm.models import create_model

from timm_adv.attacks import NORMS, create_attack, parse_eps
from timm_adv.data import DEFAULT_DATASET, apply_bundled_defaults, create_dataset
from timm_adv.evaluation import evaluate_accuracy
from timm_adv.utils import load_training_checkpoint

_logger = logging.getLogger('validate')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-adv validation: clean and adversarial accuracy')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (*deprecated*, use --data-dir)')
    parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    parser.add_argument('--dataset', metavar='NAME', default='',
                        help=f'dataset type + name (default: ImageFolder with --data-dir, {DEFAULT_DATASET} without)')
    parser.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    parser.add_argument('--dataset-download', action='store_true', default=False, help='allow download of dataset for torch/ datasets')
    parser.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
    parser.add_argument('--model', '-m', metavar='NAME', default='resnet10t',
                        help='model architecture, hf-hub:org/name or local-dir:/path (default: resnet10t)')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pre-trained model')
    parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='path to latest checkpoint (default: none)')
    parser.add_argument('--use-ema', dest='use_ema', action='store_true', help='use ema version of weights if present')
    parser.add_argument('-j', '--workers', default=2, type=int, metavar='N', help='number of data loading workers (default: 2)')
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    parser.add_argument('--img-size', default=None, type=int, metavar='N', help='Input image dimension, uses model default if empty')
    parser.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)')
    parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N', help='Input all image dimensions (d h w)')
    parser.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop pct')
    parser.add_argument('--crop-mode', default=None, type=str, metavar='N', help='Input image crop mode (squash, border, center)')
    parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value of dataset')
    parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation of of dataset')
    parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type (overrides model)')
    parser.add_argument('--num-classes', type=int, default=None, help='Number classes in dataset')
    parser.add_argument('--gp', default=None, type=str, metavar='POOL', help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc)')
    parser.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str, help='Device (accelerator) to use.')
    parser.add_argument('--amp', action='store_true', default=False, help='use mixed precision (bfloat16 on CPU)')
    parser.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    parser.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    parser.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader')
    parser.add_argument('--num-samples', type=int, default=None, metavar='N', help='evaluate only the first N samples')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    parser.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='Output csv/json file for validation results')
    parser.add_argument('--results-format', default='csv', type=str, help='Format for results file one of (csv, json) (default: csv).')
    parser.add_argument('--log-freq', default=0, type=int, metavar='N', help='batch logging frequency (default: off)')
    parser.add_argument('--seed', type=int, default=0, metavar='S', help='seed of the attacks\' random starts (default: 0)')

    group = parser.add_argument_group('Attack parameters')
    group.add_argument('--attack', choices=('none', 'fgsm', 'pgd'), default='none',
                       help='attack to evaluate besides clean accuracy (default: none)')
    group.add_argument('--eps', nargs='+', default=['8/255'], metavar='EPS',
                       help='attack radius (pixel units), e.g. 8/255; several values give accuracy vs eps (default: 8/255)')
    group.add_argument('--steps', type=int, default=20, metavar='K', help='PGD steps (default: 20; FGSM uses 1)')
    group.add_argument('--step-size', default=None, metavar='ALPHA', help='PGD step size (default: 2.5*eps/steps)')
    group.add_argument('--norm', choices=NORMS, default='linf', help='threat model norm (default: linf)')
    group.add_argument('--restarts', type=int, default=1, metavar='R', help='PGD random restarts (default: 1)')
    group.add_argument('--attack-samples', type=int, default=None, metavar='N',
                       help='attack only the first N samples of the split (default: all)')
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        args.eps = [parse_eps(e, '--eps') for e in args.eps]
        if args.step_size is not None:
            args.step_size = parse_eps(args.step_size, '--step-size')
    except ValueError as e:
        parser.error(str(e))
    if args.steps < 1:
        parser.error(f'--steps must be >= 1, got {args.steps}.')
    if args.restarts < 1:
        parser.error(f'--restarts must be >= 1, got {args.restarts}.')
    if args.attack_samples is not None and args.attack_samples < 1:
        parser.error(f'--attack-samples must be >= 1, got {args.attack_samples}.')
    if args.results_format not in ('csv', 'json'):
        parser.error(f'--results-format must be csv or json, got {args.results_format!r}.')
    return args


def _attack_key(args, eps: float) -> str:
    name = args.attack if args.attack == 'fgsm' else f'pgd{args.steps}'
    return f'{name}_top1' if len(args.eps) == 1 else f'{name}_top1@{eps:.4g}'


def validate(args) -> OrderedDict:
    """Evaluates one model; returns an ordered dict of results like timm's validate.py, plus attacks."""
    device = torch.device(args.device)
    if not args.data_dir and args.data:
        args.data_dir = args.data
    if not args.dataset and not args.data_dir:
        args.dataset = DEFAULT_DATASET
    apply_bundled_defaults(args)
    if args.data_dir and not os.path.exists(args.data_dir) and not args.dataset_download:
        raise FileNotFoundError(f'--data-dir {args.data_dir!r} does not exist; point it at your dataset, or omit '
                                f'--data-dir/--dataset to use the bundled dataset {DEFAULT_DATASET}.')

    model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                         in_chans=args.in_chans or 3, global_pool=args.gp, **args.model_kwargs)
    if args.checkpoint:
        model = load_training_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=True)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_autocast = nullcontext
    if args.amp:
        dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type == 'cpu') else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)

    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             download=args.dataset_download)
    if args.num_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_samples, len(dataset))))
    loader_args = dict(
        input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher)
    loader = create_loader(dataset, **loader_args)
    eval_kwargs = dict(device=device, amp_autocast=amp_autocast, log_interval=args.log_freq,
                       channels_last=args.channels_last)

    clean = evaluate_accuracy(model, loader, log_prefix='Clean', **eval_kwargs)
    results = OrderedDict(
        model=args.model,
        top1=round(clean['top1'], 4), top1_err=round(100 - clean['top1'], 4),
        top5=round(clean['top5'], 4), top5_err=round(100 - clean['top5'], 4),
        loss=round(clean['loss'], 6), samples=clean['samples'],
        param_count=round(param_count / 1e6, 4),
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'],
    )
    if args.attack != 'none':
        attack_loader = loader
        if args.attack_samples is not None and args.attack_samples < len(dataset):
            subset = torch.utils.data.Subset(dataset, range(args.attack_samples))
            attack_loader = create_loader(subset, **loader_args)
            subset_clean = evaluate_accuracy(model, attack_loader, log_prefix='Clean subset', **eval_kwargs)
            results['attack_subset_top1'] = round(subset_clean['top1'], 4)
        results['attack_samples'] = len(attack_loader.dataset)
        results['attack'] = args.attack
        results['norm'] = args.norm
        results['steps'] = 1 if args.attack == 'fgsm' else args.steps
        results['restarts'] = 1 if args.attack == 'fgsm' else args.restarts
        for eps in args.eps:
            torch.manual_seed(args.seed)
            if args.attack == 'fgsm':
                attack = create_attack(eps=eps, steps=1, norm=args.norm, random_start=False, bn_mode='eval',
                                       mean=data_config['mean'], std=data_config['std'])
            else:
                attack = create_attack(eps=eps, steps=args.steps, step_size=args.step_size, norm=args.norm,
                                       random_start=True, bn_mode='eval', restarts=args.restarts,
                                       mean=data_config['mean'], std=data_config['std'])
            _logger.info(f'Attacking with {attack}')
            adv = evaluate_accuracy(model, attack_loader, attack=attack, log_prefix=f'Attack eps={eps:.4g}',
                                    **eval_kwargs)
            results[_attack_key(args, eps)] = round(adv['top1'], 4)
        results['eps'] = ' '.join(f'{e:.6g}' for e in args.eps)
    return results


def format_table(results: dict) -> str:
    """A two-column markdown table of the results."""
    lines = ['| metric | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in results.items()]
    return '\n'.join(lines)


def write_results(results_file: str, results: dict, format: str = 'csv') -> None:
    tmp = results_file + '.tmp'
    with open(tmp, mode='w') as f:
        if format == 'json':
            json.dump([results], f, indent=4)
        else:
            writer = csv.DictWriter(f, fieldnames=list(results.keys()))
            writer.writeheader()
            writer.writerow(results)
    os.replace(tmp, results_file)


def main(argv=None) -> OrderedDict:
    utils.setup_default_logging()
    args = parse_args(argv)
    try:
        results = validate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f'validate.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(format_table(results))
    print(f'--result\n{json.dumps(results, indent=4)}')
    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    return results


if __name__ == '__main__':
    main()

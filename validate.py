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

from timm_adv.attacks import NORMS, create_attack, create_knn_guided_attack, parse_eps
from timm_adv.data import (DEFAULT_DATASET, TransformSubset, apply_bundled_defaults, create_bank_loader, create_dataset,
                           default_workers, spread_subset)
from timm_adv.evaluation import (IMAGENET_C_CORRUPTIONS, SEVERITIES, SHIFT_TYPES, evaluate_accuracy, evaluate_autoattack,
                                 evaluate_corruption_folder, evaluate_generated_corruptions, evaluate_shift,
                                 report_to_markdown, save_report, scan_corruption_folder)
from timm_adv.evaluation.autoattack import AUTOATTACK_VERSIONS, import_autoattack
from timm_adv.evaluation.corruptions import FOLDER_PROTOCOLS, import_imagecorruptions
from timm_adv.evaluation.knn import create_feature_model, create_knn_classifier, find_model_bank
from timm_adv.models import KNN_BACKENDS, build_feature_bank, import_faiss, load_feature_bank
from timm_adv.utils import explicit_args, load_training_checkpoint

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
    parser.add_argument('-j', '--workers', default=default_workers(2), type=int, metavar='N',
                        help='number of data loading workers (default: 2, at most the CPUs available to this process)')
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
    parser.add_argument('--num-samples', type=int, default=None, metavar='N', help='evaluate only N evenly spaced samples of the split')
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
                       help='attack only N evenly spaced samples of the split (default: all)')

    group = parser.add_argument_group('kNN evaluation of feature models (self-supervised AT)')
    group.add_argument('--knn', action='store_true',
                       help='classify with a kNN over a feature bank (the head, if any, is dropped); with --attack '
                            'pgd also reports the kNN-guided attack on the representation')
    group.add_argument('--knn-bank', default=None, metavar='FILE',
                       help='feature bank safetensors (default: knn_bank.safetensors beside a local-dir:/hf-hub: model)')
    group.add_argument('--knn-bank-split', default=None, metavar='NAME',
                       help='embed this split of the dataset as the bank instead, e.g. train')
    group.add_argument('--knn-bank-samples', type=int, default=None, metavar='N',
                       help='with --knn-bank-split: N evenly spaced images of it (default: all)')
    group.add_argument('--knn-k', type=int, default=75, metavar='K', help='kNN neighbours (default: 75)')
    group.add_argument('--knn-temperature', type=float, default=0.07, metavar='T',
                       help='kNN vote weight exp(cos / T) (default: 0.07)')
    group.add_argument('--knn-backend', choices=KNN_BACKENDS, default='torch', help='exact search backend (default: torch)')
    group.add_argument('--knn-guides', type=int, default=300, metavar='M',
                       help='guided attack: guide samples of the nearest wrong class (default: 300)')

    group = parser.add_argument_group('Robustness evaluation (timm_adv.evaluation)')
    group.add_argument('--autoattack', choices=('none',) + AUTOATTACK_VERSIONS, default='none',
                       help='official AutoAttack (pyautoattack): standard, rand, plus, or custom with --aa-attacks')
    group.add_argument('--aa-attacks', nargs='+', default=None, metavar='NAME',
                       help='attacks of --autoattack custom, e.g. apgd-ce apgd-t')
    group.add_argument('--aa-eps', default=None, metavar='EPS', help='AutoAttack radius (default: the first --eps)')
    group.add_argument('--aa-norm', choices=('linf', 'l2', 'l1'), default=None, help='AutoAttack norm (default: --norm)')
    group.add_argument('--aa-samples', type=int, default=1000, metavar='N',
                       help='AutoAttack on N samples of the split (default: 1000)')
    group.add_argument('--aa-subset', choices=('spread', 'first'), default='spread',
                       help='which --aa-samples: evenly spaced over the split, or its first N (RobustBench\'s '
                            'convention) (default: spread)')
    group.add_argument('--aa-batch-size', type=int, default=250, metavar='N', help='AutoAttack batch size (default: 250)')
    group.add_argument('--aa-iters', type=int, default=None, metavar='K',
                       help='APGD/FAB iterations, --autoattack custom only (quick checks; presets keep 100)')
    group.add_argument('--corruption-dir', default=None, metavar='DIR',
                       help='ImageNet-C style folder <corruption>/<severity>/<class>/<image>: top-1 and mCE')
    group.add_argument('--corruption-protocol', choices=tuple(FOLDER_PROTOCOLS), default='hendrycks',
                       help='--corruption-dir transform: hendrycks (the reference script: centre crop, no resize; '
                            'comparable with published mCE) or model (the model\'s eval transform) (default: hendrycks)')
    group.add_argument('--corruptions-generated', action='store_true',
                       help='generate corruptions on the fly with imagecorruptions on the evaluated split')
    group.add_argument('--corruptions', nargs='+', default=list(IMAGENET_C_CORRUPTIONS), metavar='NAME',
                       help='corruptions to evaluate (default: the 15 ImageNet-C ones)')
    group.add_argument('--severities', nargs='+', type=int, default=list(SEVERITIES), metavar='S',
                       help='severities to evaluate (default: 1 2 3 4 5)')
    group.add_argument('--corruption-samples', type=int, default=None, metavar='N',
                       help='images per corruption and severity (default: all)')
    group.add_argument('--shift-dir', default=None, metavar='DIR', help='distribution-shift folder <class>/<image>')
    group.add_argument('--shift-type', choices=tuple(SHIFT_TYPES), default=None,
                       help='dataset in --shift-dir (imagenet-a/-r use their 200-class logit subsets)')
    group.add_argument('--report-dir', default=None, metavar='DIR',
                       help='write robustness.json, robustness.md and PNG plots (accuracy vs eps / severity) here')
    group.add_argument('--no-plots', action='store_true', help='with --report-dir: skip the PNG plots')
    return parser


#: Flags that only act with some other setting: ``dest: (does it act?, what it needs)``.
_NEEDS = {
    'steps': (lambda a: a.attack == 'pgd', '--attack pgd'),
    'step_size': (lambda a: a.attack == 'pgd', '--attack pgd'),
    'restarts': (lambda a: a.attack == 'pgd', '--attack pgd'),
    'attack_samples': (lambda a: a.attack != 'none', '--attack fgsm|pgd'),
    'eps': (lambda a: a.attack != 'none' or (a.autoattack != 'none' and a.aa_eps is None),
            '--attack fgsm|pgd (or --autoattack without --aa-eps)'),
    'norm': (lambda a: a.attack != 'none' or (a.autoattack != 'none' and a.aa_norm is None),
             '--attack fgsm|pgd (or --autoattack without --aa-norm)'),
    'aa_attacks': (lambda a: a.autoattack == 'custom', '--autoattack custom'),
    'aa_iters': (lambda a: a.autoattack == 'custom', '--autoattack custom (the presets fix their iterations)'),
    'aa_eps': (lambda a: a.autoattack != 'none', '--autoattack'),
    'aa_norm': (lambda a: a.autoattack != 'none', '--autoattack'),
    'aa_samples': (lambda a: a.autoattack != 'none', '--autoattack'),
    'aa_subset': (lambda a: a.autoattack != 'none', '--autoattack'),
    'aa_batch_size': (lambda a: a.autoattack != 'none', '--autoattack'),
    'corruption_protocol': (lambda a: bool(a.corruption_dir), '--corruption-dir'),
    'corruptions': (lambda a: bool(a.corruption_dir) or a.corruptions_generated,
                    '--corruption-dir or --corruptions-generated'),
    'severities': (lambda a: bool(a.corruption_dir) or a.corruptions_generated,
                   '--corruption-dir or --corruptions-generated'),
    'corruption_samples': (lambda a: bool(a.corruption_dir) or a.corruptions_generated,
                           '--corruption-dir or --corruptions-generated'),
    'no_plots': (lambda a: bool(a.report_dir), '--report-dir'),
    **{dest: (lambda a: a.knn, '--knn') for dest in ('knn_bank', 'knn_bank_split', 'knn_k', 'knn_temperature',
                                                     'knn_backend')},
    'knn_bank_samples': (lambda a: a.knn and bool(a.knn_bank_split), '--knn --knn-bank-split'),
    'knn_guides': (lambda a: a.knn and a.attack != 'none', '--knn and --attack fgsm|pgd (the guided attack)'),
}


def check_ignored_flags(args: argparse.Namespace, explicit) -> None:
    """Raises ValueError naming the first flag the user set that would do nothing with these settings."""
    for dest, flag in explicit.items():
        acts, needs = _NEEDS.get(dest, (None, None))
        if acts is not None and not acts(args):
            context = f' (got --attack {args.attack})' if needs.startswith('--attack') else ''
            raise ValueError(f'{flag} does nothing without {needs}{context}; drop it.')


def parse_args(argv=None) -> argparse.Namespace:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        check_ignored_flags(args, explicit_args(parser, argv))
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
    if args.aa_samples < 1:
        parser.error(f'--aa-samples must be >= 1, got {args.aa_samples}.')
    try:
        args.aa_eps = parse_eps(args.aa_eps, '--aa-eps') if args.aa_eps is not None else args.eps[0]
    except ValueError as e:
        parser.error(str(e))
    if bool(args.shift_dir) != bool(args.shift_type):
        parser.error('--shift-dir and --shift-type go together, e.g. --shift-dir /data/imagenet-a --shift-type imagenet-a.')
    if args.corruption_dir and args.corruptions_generated:
        parser.error('--corruption-dir and --corruptions-generated are exclusive; pick the released folder or regeneration.')
    if args.results_format not in ('csv', 'json'):
        parser.error(f'--results-format must be csv or json, got {args.results_format!r}.')
    _check_knn_args(parser, args)
    return args


def _check_knn_args(parser, args) -> None:
    if args.knn_bank and args.knn_bank_split:
        parser.error('--knn-bank and --knn-bank-split are exclusive: load a saved bank or embed a split.')
    if args.knn_k < 1:
        parser.error(f'--knn-k must be >= 1, got {args.knn_k}.')
    if not args.knn_temperature > 0:
        parser.error(f'--knn-temperature must be > 0, got {args.knn_temperature}.')
    if args.knn_guides < 1:
        parser.error(f'--knn-guides must be >= 1, got {args.knn_guides}.')


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
    # bad robustness inputs and missing optional packages fail before any evaluation
    if args.autoattack != 'none':
        import_autoattack()
    if args.corruptions_generated:
        import_imagecorruptions()
    if args.corruption_dir:
        scan_corruption_folder(args.corruption_dir, args.corruptions, args.severities)
    if args.shift_dir and not os.path.isdir(args.shift_dir):
        raise FileNotFoundError(f'--shift-dir {args.shift_dir!r} is not a folder; point it at the extracted '
                                f'{args.shift_type} dataset.')
    if args.knn and args.knn_backend == 'faiss':
        import_faiss()
    if args.knn and not args.knn_bank_split:
        args.knn_bank = args.knn_bank or find_model_bank(args.model)
        if not args.knn_bank:
            raise ValueError(f'--knn: {args.model!r} has no feature bank; pass --knn-bank FILE (the '
                             f'knn_bank.safetensors of its export) or --knn-bank-split train to embed the training split.')
        bank = load_feature_bank(args.knn_bank)

    # a hub or folder model without --checkpoint is only meaningful with its own weights
    pretrained = args.pretrained or (args.model.startswith(('hf-hub:', 'local-dir:')) and not args.checkpoint)
    torch.manual_seed(args.seed)  # reproducible even for a model left at its random initialisation
    if args.knn:
        model = create_feature_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint,
                                     use_ema=args.use_ema, in_chans=args.in_chans or 3, global_pool=args.gp,
                                     **args.model_kwargs)
    else:
        model = create_model(args.model, pretrained=pretrained, num_classes=args.num_classes,
                             in_chans=args.in_chans or 3, global_pool=args.gp, **args.model_kwargs)
        if args.checkpoint:
            model = load_training_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    param_count = sum(p.numel() for p in model.parameters())
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=True)
    model.to(device).eval()
    if args.knn:
        if args.knn_bank_split:
            bank_loader = create_bank_loader(
                args.dataset, args.data_dir, args.knn_bank_split, data_config, batch_size=args.batch_size,
                workers=args.workers, device=device, num_samples=args.knn_bank_samples,
                use_prefetcher=not args.no_prefetcher, class_map=args.class_map, download=args.dataset_download)
            bank = build_feature_bank(model, bank_loader, args.num_classes, device=device)
        model = create_knn_classifier(model, bank, args.knn_k, args.knn_temperature, args.knn_backend, device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_autocast = nullcontext
    if args.amp:
        dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type == 'cpu') else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)

    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             download=args.dataset_download)
    if args.num_samples is not None:
        dataset = spread_subset(dataset, args.num_samples)
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
    report = OrderedDict(model=args.model, dataset=args.dataset or args.data_dir, split=args.split,
                         clean=dict(top1=clean['top1'], top5=clean['top5'], samples=clean['samples']))
    if args.attack != 'none':
        attack_loader = loader
        if args.attack_samples is not None and args.attack_samples < len(dataset):
            attack_loader = create_loader(spread_subset(dataset, args.attack_samples), **loader_args)
            subset_clean = evaluate_accuracy(model, attack_loader, log_prefix='Clean subset', **eval_kwargs)
            results['attack_subset_top1'] = round(subset_clean['top1'], 4)
            report['attack_subset_clean'] = dict(top1=subset_clean['top1'], samples=subset_clean['samples'])
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
            report.setdefault('pgd', []).append(dict(
                attack=args.attack, eps=eps, norm=args.norm, steps=attack.steps, step_size=attack.step_size,
                restarts=attack.restarts, samples=adv['samples'], top1=adv['top1']))
            if args.knn:
                _evaluate_knn_guided(args, model, eps, attack, attack_loader, eval_kwargs, results, report)
        results['eps'] = ' '.join(f'{e:.6g}' for e in args.eps)
    aa_loader = None
    if args.autoattack != 'none':
        if args.aa_subset == 'first':
            aa_subset = TransformSubset(dataset, range(min(args.aa_samples, len(dataset))))
        else:
            aa_subset = spread_subset(dataset, args.aa_samples)
        aa_loader = create_loader(aa_subset, **loader_args)
    _evaluate_robustness(args, model, data_config, aa_loader, device, results, report, amp_autocast=amp_autocast)
    if args.report_dir:
        save_report(report, args.report_dir, plots=not args.no_plots)
    results['report'] = report
    return results


def _evaluate_knn_guided(args, knn, eps, attack, loader, eval_kwargs, results, report) -> None:
    """kNN top-1 under the guided attack on the representation (same eps, steps and step size as the PGD)."""
    if args.restarts > 1:
        _logger.warning('--restarts applies to the PGD through the soft vote; the guided attack runs one restart.')
    torch.manual_seed(args.seed)
    guided = create_knn_guided_attack(eps=eps, steps=attack.steps, step_size=attack.step_size, norm=args.norm,
                                      random_start=attack.random_start, num_guides=args.knn_guides,
                                      mean=attack.normalizer.mean, std=attack.normalizer.std)
    _logger.info(f'Attacking with {guided}')
    adv = evaluate_accuracy(knn, loader, attack=guided, log_prefix=f'Guided eps={eps:.4g}', **eval_kwargs)
    key = _attack_key(args, eps).replace(args.attack if args.attack == 'fgsm' else 'pgd', 'knn_guided', 1)
    results[key] = round(adv['top1'], 4)
    report.setdefault('knn_guided', []).append(dict(eps=eps, steps=guided.steps, guides=guided.num_guides,
                                                    samples=adv['samples'], top1=adv['top1']))


def _evaluate_robustness(args, model, data_config, aa_loader, device, results, report,
                         amp_autocast=nullcontext) -> None:
    """AutoAttack, corruptions and distribution shift, as requested; fills the flat results and the report.

    All of them run under ``--amp`` / ``--channels-last`` like the clean and PGD evaluations.
    """
    precision = dict(amp_autocast=amp_autocast, channels_last=args.channels_last)
    if args.autoattack != 'none':
        aa = evaluate_autoattack(
            model, aa_loader, eps=args.aa_eps, mean=data_config['mean'], std=data_config['std'],
            norm=args.aa_norm or args.norm, version=args.autoattack, attacks=args.aa_attacks,
            num_samples=args.aa_samples, batch_size=args.aa_batch_size, device=device, seed=args.seed,
            n_iter=args.aa_iters, **precision)
        aa['subset'] = 'first' if args.aa_subset == 'first' else 'evenly spaced'
        aa['amp'] = bool(args.amp)
        report['autoattack'] = aa
        results['aa_top1'] = round(aa['robust_top1'], 4)
        results['aa_clean_top1'] = round(aa['clean_top1'], 4)
        results['aa_samples'] = aa['samples']
        results['aa_iterations'] = ' '.join(f'{k}:{v}' for k, v in aa['iterations'].items())
    corruption_kwargs = dict(corruptions=args.corruptions, severities=args.severities,
                             num_samples=args.corruption_samples, batch_size=args.batch_size, workers=args.workers,
                             device=device, **precision)
    if args.corruption_dir:
        corr = evaluate_corruption_folder(model, args.corruption_dir, data_config, protocol=args.corruption_protocol,
                                          label_names=model.pretrained_cfg.get('label_names'), **corruption_kwargs)
    elif args.corruptions_generated:
        raw = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             download=args.dataset_download)
        if args.num_samples is not None:  # the same images as the clean evaluation
            raw = spread_subset(raw, args.num_samples)
        corr = evaluate_generated_corruptions(model, raw, data_config, seed=args.seed, **corruption_kwargs)
    else:
        corr = None
    if corr is not None:
        report['corruptions'] = corr
        prefix = 'c' if corr['source'] == 'folder' else 'cgen'
        results[f'{prefix}_mean_top1'] = round(corr['mean_top1'], 4)
        if 'mce' in corr:
            results[f'{prefix}_mce'] = round(corr['mce'], 4)
        if 'protocol' in corr:
            results['c_protocol'] = corr['protocol']
    if args.shift_dir:
        shift = evaluate_shift(model, args.shift_dir, args.shift_type, data_config, batch_size=args.batch_size,
                               workers=args.workers, device=device, **precision)
        report.setdefault('shift', {})[args.shift_type] = shift
        results[f'{args.shift_type}_top1'] = round(shift['top1'], 4)


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
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f'validate.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    report = results.pop('report')
    print(format_table(results))
    if any(k in report for k in ('autoattack', 'corruptions', 'shift')):  # beyond the flat table above
        print(report_to_markdown(report))
    print(f'--result\n{json.dumps(results, indent=4)}')
    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    return results


if __name__ == '__main__':
    main()

"""timm-adv validation: timm's validate.py flags plus clean and adversarial (FGSM / PGD) accuracy.

    python validate.py --model resnet10t --checkpoint output/train/run/model_best.pth.tar \\
        --attack pgd --eps 0.1 --steps 20

(installed: ``timm-adv-validate``, the same flags).

Models load by name (with ``--pretrained``), from ``hf-hub:org/name`` or ``local-dir:/path``, and
from any timm or timm-adv training checkpoint (``--checkpoint``). Without ``--data-dir`` /
``--dataset`` the bundled offline dataset ``bundled/mnist`` (validation split) is used.
"""
import argparse
import copy
import importlib.util
import json
import logging
import os
import re
import sys
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial

import torch
from timm import utils
from timm.data import create_loader, resolve_data_config
from timm.layers import apply_test_time_pool, set_fast_norm
from timm.models import NaFlexVit, create_model
from timm.utils import reparameterize_model, set_jit_fuser

from timm_adv.attacks import GUIDE_MODES, NORMS, create_attack, parse_eps
from timm_adv.data import (DEFAULT_DATASET, TransformSubset, apply_bundled_defaults, create_bank_loader, create_dataset,
                           default_workers, is_bundled, random_subset, resolve_dataset_name, spread_subset)
from timm_adv.evaluation import (IMAGENET_C_CORRUPTIONS, SEVERITIES, SHIFT_TYPES, LogitSubset, evaluate_accuracy,
                                 evaluate_autoattack, evaluate_corruption_folder, evaluate_generated_corruptions,
                                 evaluate_shift, report_to_markdown, save_report, scan_corruption_folder)
from timm_adv.evaluation.autoattack import AUTOATTACK_VERSIONS, import_autoattack
from timm_adv.evaluation.bulk import list_bulk_models, run_with_retry, write_results
from timm_adv.evaluation.corruptions import FOLDER_PROTOCOLS, import_imagecorruptions
from timm_adv.evaluation.knn import (create_feature_model, create_knn_classifier, evaluate_knn_robustness,
                                     find_model_bank, knn_attacks)
from timm_adv.evaluation.labels import ClassMetrics, create_real_labels, read_valid_labels
from timm_adv.evaluation.model_wrap import DtypeModel, wrap_eval_model
from timm_adv.evaluation.protocols import PROTOCOLS, image_list_subset, read_image_list, robustbench_image_list
from timm_adv.models import BANK_DTYPES, KNN_BACKENDS, KNN_VOTES, build_feature_bank, import_faiss, load_feature_bank
from timm_adv.utils import ProgressLog, explicit_args, load_training_checkpoint

_logger = logging.getLogger('validate')


def build_parser() -> argparse.ArgumentParser:
    """The validate.py parser: timm's validate.py flags, then the attack and evaluation ones."""
    parser = argparse.ArgumentParser(description='timm-adv validation: clean and adversarial accuracy')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (*deprecated*, use --data-dir)')
    parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    parser.add_argument('--dataset', metavar='NAME', default='',
                        help=f'dataset type + name (default: ImageFolder with --data-dir, {DEFAULT_DATASET} without)')
    parser.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
    parser.add_argument('--dataset-download', action='store_true', default=False, help='allow download of dataset for torch/ datasets')
    parser.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
    parser.add_argument('--num-samples', type=int, default=None, metavar='N',
                        help='evaluate N samples: evenly spaced ones of a map-style split, the first N of an '
                             'iterable one (hfids/, wds/, tfds/)')
    parser.add_argument('--input-key', default=None, type=str, help='Dataset key for input images (hfds/ hfids/ wds/ tfds/)')
    parser.add_argument('--input-img-mode', default=None, type=str,
                        help='Dataset image conversion mode for input images (default: RGB, L for 1 channel)')
    parser.add_argument('--target-key', default=None, type=str, help='Dataset key for target labels (hfds/ hfids/ wds/ tfds/)')
    parser.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                        help='Allow huggingface dataset import to execute code downloaded from the dataset\'s repo.')
    parser.add_argument('--model', '-m', metavar='NAME', default='resnet10t',
                        help='model architecture, hf-hub:org/name or local-dir:/path (default: resnet10t); bulk '
                             'mode: a wildcard over pretrained models (\'resnet*\'), all, or a file of model names')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true',
                        help='use pre-trained model (the default without --checkpoint, as in timm)')
    parser.add_argument('--no-pretrained', action='store_true', default=False,
                        help='evaluate the randomly initialised model (without --checkpoint timm-adv, like timm, '
                             'loads the pretrained weights; timm has no way to skip them)')
    parser.add_argument('--checkpoint', default='', type=str, metavar='PATH',
                        help='path to latest checkpoint (default: none); a folder evaluates each *.pth.tar / *.pth in it')
    parser.add_argument('--use-ema', dest='use_ema', action='store_true', help='use ema version of weights if present')
    parser.add_argument('-j', '--workers', default=default_workers(2), type=int, metavar='N',
                        help='number of data loading workers (default: 2, at most the CPUs available to this process)')
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    parser.add_argument('--img-size', default=None, type=int, metavar='N', help='Input image dimension, uses model default if empty')
    parser.add_argument('--in-chans', type=int, default=None, metavar='N', help='Image input channels (default: None => 3)')
    parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N', help='Input all image dimensions (d h w)')
    parser.add_argument('--use-train-size', action='store_true', default=False,
                        help='force use of train input size, even when test size is specified in pretrained cfg')
    parser.add_argument('--crop-pct', default=None, type=float, metavar='N', help='Input image center crop pct')
    parser.add_argument('--crop-mode', default=None, type=str, metavar='N', help='Input image crop mode (squash, border, center)')
    parser.add_argument('--crop-border-pixels', type=int, default=None, help='Crop pixels from image border.')
    parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='Override mean pixel value of dataset')
    parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='Override std deviation of of dataset')
    parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='Image resize interpolation type (overrides model)')
    parser.add_argument('--num-classes', type=int, default=None, help='Number classes in dataset')
    parser.add_argument('--gp', default=None, type=str, metavar='POOL', help='Global pool type, one of (fast, avg, max, avgmax, avgmaxc)')
    parser.add_argument('--num-gpu', type=int, default=1, help='Number of GPUS to use (nn.DataParallel)')
    parser.add_argument('--test-pool', dest='test_pool', action='store_true', help='enable test time pool')
    parser.add_argument('--channels-last', action='store_true', default=False, help='Use channels_last memory layout')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str, help='Device (accelerator) to use.')
    parser.add_argument('--amp', action='store_true', default=False, help='use mixed precision (bfloat16 on CPU)')
    parser.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16)')
    parser.add_argument('--model-dtype', default=None, choices=('float32', 'float16', 'bfloat16'),
                        help='Model dtype override (non-AMP) (default: float32)')
    parser.add_argument('--tf-preprocessing', action='store_true', default=False,
                        help='Use Tensorflow preprocessing pipeline (require CPU TF installed')
    parser.add_argument('--fuser', default='', type=str, help="Select jit fuser. One of ('', 'te', 'old', 'nvfuser')")
    parser.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    parser.add_argument('--reparam', default=False, action='store_true', help='Reparameterize model')
    parser.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    parser.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    parser.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None).')
    scripting_group = parser.add_mutually_exclusive_group()
    scripting_group.add_argument('--torchscript', default=False, action='store_true', help='torch.jit.script the full model')
    scripting_group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                                 help='Enable compilation w/ specified backend (default: inductor); the attacks '
                                      'differentiate through the compiled model')
    scripting_group.add_argument('--aot-autograd', default=False, action='store_true', help='Enable AOT Autograd support.')
    parser.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='Output csv/json file for validation results')
    parser.add_argument('--results-format', default='csv', type=str, help='Format for results file one of (csv, json) (default: csv).')
    parser.add_argument('--real-labels', default='', type=str, metavar='FILENAME',
                        help='Real labels JSON file for imagenet evaluation (scores the clean and --attack top-1/top-5)')
    parser.add_argument('--valid-labels', default='', type=str, metavar='FILENAME',
                        help='Valid label indices txt file for validation of partial label space (every evaluation)')
    parser.add_argument('--retry', default=False, action='store_true',
                        help='Enable batch size decay & retry for single model validation (bulk runs always retry)')
    parser.add_argument('--log-freq', default=0, type=int, metavar='N', help='batch logging frequency (default: off)')
    parser.add_argument('--seed', type=int, default=0, metavar='S',
                        help='random seed: the attacks\' random starts, iterable dataset shuffling (default: 0)')
    parser.add_argument('--metrics-avg', type=str, default=None, choices=['micro', 'macro', 'weighted'],
                        help='clean precision, recall and F1-score with this averaging (scikit-learn) (default: None)')
    parser.add_argument('--naflex-loader', action='store_true', default=False,
                        help='Use NaFlex loader (Requires NaFlex compatible model; clean accuracy only)')
    parser.add_argument('--naflex-max-seq-len', type=int, default=576,
                        help='Fixed maximum sequence length for NaFlex loader (validation)')

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
                            'pgd also reports the kNN-guided attack on the representation and the per-sample worst '
                            'case of both (knn_worst*_top1: the robust accuracy)')
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
    group.add_argument('--knn-guide-mode', choices=GUIDE_MODES, default='class',
                       help="guided attack: guides nearest the sample (class) or nearest the nearest wrong-class "
                            "entry (neighbours, the official notebook's guide=2) (default: class)")
    group.add_argument('--knn-vote', choices=KNN_VOTES, default='weighted',
                       help="kNN vote: similarity-weighted exp(cos / T) or DkNN's unweighted count (default: weighted)")
    group.add_argument('--knn-bank-dtype', choices=tuple(BANK_DTYPES), default=None,
                       help='storage dtype of the bank (similarities stay float32) (default: float32 for an embedded '
                            'split, the file\'s for --knn-bank)')

    group = parser.add_argument_group('Robustness evaluation (timm_adv.evaluation)')
    group.add_argument('--autoattack', choices=('none',) + AUTOATTACK_VERSIONS, default='none',
                       help='official AutoAttack (pyautoattack): standard, rand, plus, or custom with --aa-attacks')
    group.add_argument('--aa-attacks', nargs='+', default=None, metavar='NAME',
                       help='attacks of --autoattack custom, e.g. apgd-ce apgd-t')
    group.add_argument('--aa-eps', default=None, metavar='EPS', help='AutoAttack radius (default: the first --eps)')
    group.add_argument('--aa-norm', choices=('linf', 'l2', 'l1'), default=None, help='AutoAttack norm (default: --norm)')
    group.add_argument('--aa-samples', type=int, default=1000, metavar='N',
                       help='AutoAttack on N samples of the split (default: 1000)')
    group.add_argument('--aa-subset', choices=('spread', 'first', 'random'), default='spread',
                       help='which --aa-samples: evenly spaced over the split, its first N (RobustBench\'s '
                            'convention), or N drawn at random with --seed (default: spread)')
    group.add_argument('--aa-image-list', default=None, metavar='FILE',
                       help='AutoAttack on the images named in FILE (one <wnid>/<file> per line, matched by file '
                            'name), in its order; --aa-samples takes the first N')
    group.add_argument('--protocol', choices=tuple(PROTOCOLS), default=None,
                       help='a published evaluation protocol: robustbench-imagenet = --autoattack standard --aa-eps '
                            "4/255 --aa-norm linf --aa-samples 5000 on RobustBench's 5,000 ImageNet validation images "
                            '(its list from the installed robustbench, or --aa-image-list)')
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
    'aa_subset': (lambda a: a.autoattack != 'none' and not a.aa_image_list and not a.protocol,
                  '--autoattack (and not with --aa-image-list or --protocol, which fix the images)'),
    'aa_image_list': (lambda a: a.autoattack != 'none', '--autoattack'),
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
                                                     'knn_backend', 'knn_vote', 'knn_bank_dtype')},
    'knn_bank_samples': (lambda a: a.knn and bool(a.knn_bank_split), '--knn --knn-bank-split'),
    'knn_guides': (lambda a: a.knn and a.attack != 'none', '--knn and --attack fgsm|pgd (the guided attack)'),
    'knn_guide_mode': (lambda a: a.knn and a.attack != 'none', '--knn and --attack fgsm|pgd (the guided attack)'),
    'torchcompile_mode': (lambda a: bool(a.torchcompile), '--torchcompile'),
    'fuser': (lambda a: a.torchscript, '--torchscript (it selects the TorchScript fuser)'),
    'naflex_max_seq_len': (lambda a: a.naflex_loader, '--naflex-loader'),
    'input_key': (lambda a: _dataset_kind(a) in _KEYED_DATASETS, 'a --dataset hfds/, hfids/, wds/ or tfds/'),
    'target_key': (lambda a: _dataset_kind(a) in _KEYED_DATASETS, 'a --dataset hfds/, hfids/, wds/ or tfds/'),
    'dataset_trust_remote_code': (lambda a: _dataset_kind(a) in ('hfds', 'hfids'), 'a --dataset hfds/ or hfids/'),
    'input_img_mode': (lambda a: not is_bundled(resolve_dataset_name(a)),
                       'a timm dataset (--data-dir or --dataset; bundled datasets are RGB)'),
}

#: Dataset types whose records are read by key (``--input-key`` / ``--target-key``).
_KEYED_DATASETS = ('hfds', 'hfids', 'wds', 'tfds')
#: Dataset types read as streams: ``--num-samples`` goes to timm's dataset, no subset is drawn.
_ITERABLE_DATASETS = ('hfids', 'wds', 'tfds')


def _dataset_kind(args) -> str:
    name = resolve_dataset_name(args)
    return name.split('/', 1)[0].lower() if '/' in name else ''


def _flags_set(args, flags) -> list:
    return [flag for dest, flag in flags if getattr(args, dest) not in (None, False, '', 'none')]


def check_combinations(args: argparse.Namespace) -> None:
    """Raises ValueError for timm flags that cannot act together with a requested evaluation."""
    robustness = (('autoattack', '--autoattack'), ('corruption_dir', '--corruption-dir'),
                  ('corruptions_generated', '--corruptions-generated'), ('shift_dir', '--shift-dir'))
    own_transforms = (('corruption_dir', '--corruption-dir'), ('corruptions_generated', '--corruptions-generated'),
                      ('shift_dir', '--shift-dir'), ('knn_bank_split', '--knn-bank-split'))
    refusals = [
        ('naflex_loader', '--naflex-loader', (('attack', '--attack'), *robustness, ('knn', '--knn'),
                                              ('channels_last', '--channels-last'), ('test_pool', '--test-pool'),
                                              ('tf_preprocessing', '--tf-preprocessing')),
         'its batches are patch dicts, which the attacks, the kNN and the other evaluations do not take; '
         'evaluate clean accuracy with it, the rest without it'),
        ('real_labels', '--real-labels', (*robustness, ('knn', '--knn')),
         'ReaL labels score the clean and --attack evaluations; the others (and the kNN-guided attack) score '
         'against the dataset labels, so run them without --real-labels'),
        ('valid_labels', '--valid-labels', (('shift_dir', '--shift-dir'), ('knn', '--knn')),
         '--shift-type and --knn choose their own classes'),
        ('test_pool', '--test-pool', (('knn', '--knn'),), 'the kNN drops the classifier head that test-time pooling wraps'),
        ('torchscript', '--torchscript', (('knn', '--knn'),), 'the kNN classifier is not scriptable; use --torchcompile'),
        ('aot_autograd', '--aot-autograd', (('attack', '--attack'), ('autoattack', '--autoattack'), ('knn', '--knn')),
         'functorch\'s memory_efficient_fusion compiles for the grad mode of its first call (the clean, no-grad '
         'pass), so attacks would get no input gradient, and it does not trace the kNN; use --torchcompile'),
        ('model_dtype', '--model-dtype', (('knn', '--knn'),), 'the feature bank is float32'),
        ('tf_preprocessing', '--tf-preprocessing', (('no_prefetcher', '--no-prefetcher'), *own_transforms),
         'the TF pipeline runs in the prefetching loader of the clean, --attack and --autoattack evaluations only'),
        ('crop_border_pixels', '--crop-border-pixels', own_transforms,
         'the border crop is in the loader of the clean, --attack and --autoattack evaluations only'),
    ]
    for dest, flag, others, why in refusals:
        if getattr(args, dest) not in (None, False, ''):
            clash = _flags_set(args, others)
            if clash:
                raise ValueError(f'{flag} cannot be combined with {", ".join(clash)}: {why}.')
    if args.model_dtype not in (None, 'float32') and args.amp:
        raise ValueError(f'--model-dtype {args.model_dtype} cannot be combined with --amp: AMP needs a float32 model.')
    if args.num_gpu < 1:
        raise ValueError(f'--num-gpu must be >= 1, got {args.num_gpu}.')


def check_ignored_flags(args: argparse.Namespace, explicit) -> None:
    """Raises ValueError naming the first flag the user set that would do nothing with these settings."""
    for dest, flag in explicit.items():
        acts, needs = _NEEDS.get(dest, (None, None))
        if acts is not None and not acts(args):
            context = f' (got --attack {args.attack})' if needs.startswith('--attack') else ''
            raise ValueError(f'{flag} does nothing without {needs}{context}; drop it.')


def apply_protocol(args: argparse.Namespace, explicit) -> None:
    """Sets the flags a ``--protocol`` preset fixes; a conflicting explicit flag is an error naming it."""
    if not args.protocol:
        return
    for dest, value in PROTOCOLS[args.protocol]['settings'].items():
        flag = '--' + dest.replace('_', '-')
        if dest in explicit and str(getattr(args, dest)) != str(value):
            raise ValueError(f'--protocol {args.protocol} fixes {flag} {value}; drop {explicit[dest]}.')
        setattr(args, dest, value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        explicit = explicit_args(parser, argv)
        apply_protocol(args, explicit)
        check_ignored_flags(args, explicit)
        check_combinations(args)
        args.eps = [parse_eps(e, '--eps') for e in args.eps]
        if args.step_size is not None:
            args.step_size = parse_eps(args.step_size, '--step-size')
    except ValueError as e:
        parser.error(str(e))
    if args.no_pretrained and (args.pretrained or args.checkpoint):
        parser.error('--no-pretrained evaluates random weights; drop it, or drop --pretrained / --checkpoint.')
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


def _prepare_data_args(args) -> None:
    """Dataset defaults and the checks that need no model: missing folders and optional packages fail first."""
    if not args.data_dir and args.data:
        args.data_dir = args.data
    if not args.dataset and not args.data_dir:
        args.dataset = DEFAULT_DATASET
    apply_bundled_defaults(args)
    if args.data_dir and not os.path.exists(args.data_dir) and not args.dataset_download:
        raise FileNotFoundError(f'--data-dir {args.data_dir!r} does not exist; point it at your dataset, or omit '
                                f'--data-dir/--dataset to use the bundled dataset {DEFAULT_DATASET}.')
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
    for flag, module, extra in (('--tf-preprocessing', 'tensorflow', 'tensorflow-cpu'),
                                ('--metrics-avg', 'sklearn', 'scikit-learn')):
        if getattr(args, flag[2:].replace('-', '_')) and importlib.util.find_spec(module) is None:
            raise ImportError(f'{flag} needs {module}: pip install {extra}')
    for flag, path in (('--valid-labels', args.valid_labels), ('--real-labels', args.real_labels)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f'{flag} {path!r} does not exist.')


def create_eval_model(args, device: torch.device):
    """The model as timm's validate.py builds it, with the adversarial evaluation's wrappers.

    Returns ``(model, base, data_config, crop_pct)``: the model to evaluate (kNN classifier, valid-label
    subset, dtype cast, script / compile / DataParallel as asked), the timm model inside it, its data
    config, and the crop (1.0 under test-time pooling, like timm).
    """
    # as timm's validate.py: without --checkpoint the model's own (pretrained) weights are evaluated
    pretrained = args.pretrained or not (args.checkpoint or args.no_pretrained)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    torch.manual_seed(args.seed)  # reproducible even for a model left at its random initialisation
    if args.knn:
        model = create_feature_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint,
                                     use_ema=args.use_ema, in_chans=in_chans, global_pool=args.gp, **args.model_kwargs)
    else:
        model = create_model(args.model, pretrained=pretrained, num_classes=args.num_classes, in_chans=in_chans,
                             global_pool=args.gp, scriptable=args.torchscript, **args.model_kwargs)
        if args.checkpoint:
            model = load_training_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    if args.naflex_loader and not isinstance(model, NaFlexVit):
        raise ValueError(f'--naflex-loader feeds patch dicts, which only NaFlex models take (naflexvit_*); '
                         f'{args.model} takes images: drop --naflex-loader.')
    if args.reparam:
        model = reparameterize_model(model)
    base = model
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    if args.use_train_size and data_config == resolve_data_config(vars(args), model=model, use_test_size=True):
        _logger.warning(f'--use-train-size changes nothing for {args.model}: no separate test input size '
                        f'(or --img-size / --input-size given).')
    crop_pct = data_config['crop_pct']
    if args.test_pool:
        model, pooled = apply_test_time_pool(model, data_config)
        if pooled:
            crop_pct = 1.0
        else:
            _logger.warning(f'--test-pool changes nothing for {args.model}: input size {data_config["input_size"]} '
                            f'is not larger than its pretrained size.')
    model_dtype = getattr(torch, args.model_dtype) if args.model_dtype else None
    model.to(device=device, dtype=model_dtype).eval()
    if args.knn:
        model = _create_knn(args, model, data_config, device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.valid_labels:
        model = LogitSubset(model, read_valid_labels(args.valid_labels)).to(device)
    if model_dtype not in (None, torch.float32):
        model = DtypeModel(model, model_dtype)
    model = wrap_eval_model(model, torchscript=args.torchscript, torchcompile=args.torchcompile,
                            torchcompile_mode=args.torchcompile_mode, aot_autograd=args.aot_autograd,
                            num_gpu=args.num_gpu)
    return model, base, data_config, crop_pct


def _create_knn(args, model, data_config, device):
    if args.knn_bank_split:
        bank_loader = create_bank_loader(
            args.dataset, args.data_dir, args.knn_bank_split, data_config, batch_size=args.batch_size,
            workers=args.workers, device=device, num_samples=args.knn_bank_samples,
            use_prefetcher=not args.no_prefetcher, class_map=args.class_map, download=args.dataset_download)
        bank = build_feature_bank(model, bank_loader, args.num_classes, device=device,
                                  dtype=BANK_DTYPES[args.knn_bank_dtype or 'float32'])
    else:
        args.knn_bank = args.knn_bank or find_model_bank(args.model)
        if not args.knn_bank:
            raise ValueError(f'--knn: {args.model!r} has no feature bank; pass --knn-bank FILE (the '
                             f'knn_bank.safetensors of its export) or --knn-bank-split train to embed the training split.')
        bank = load_feature_bank(args.knn_bank, dtype=BANK_DTYPES[args.knn_bank_dtype] if args.knn_bank_dtype else None)
    return create_knn_classifier(model, bank, args.knn_k, args.knn_temperature, args.knn_backend, device=device,
                                 vote=args.knn_vote)


def create_eval_dataset(args, data_config):
    """The evaluated split, with timm's dataset options; ``--num-samples`` spreads a map-style split."""
    iterable = _dataset_kind(args) in _ITERABLE_DATASETS
    timm_kwargs = {}
    if not is_bundled(args.dataset):
        timm_kwargs = dict(
            input_key=args.input_key, target_key=args.target_key, trust_remote_code=args.dataset_trust_remote_code,
            input_img_mode=args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L'),
            load_bytes=args.tf_preprocessing, seed=args.seed, num_samples=args.num_samples if iterable else None)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             download=args.dataset_download, **timm_kwargs)
    if args.num_samples is not None and not iterable:
        dataset = spread_subset(dataset, args.num_samples)
    return dataset


def _loader_factory(args, data_config, crop_pct, device, model):
    """``dataset -> loader`` with the evaluation's transform (timm's loader, or its NaFlex loader)."""
    common = dict(batch_size=args.batch_size, interpolation=data_config['interpolation'], mean=data_config['mean'],
                  std=data_config['std'], num_workers=args.workers, crop_pct=crop_pct,
                  crop_mode=data_config['crop_mode'], crop_border_pixels=args.crop_border_pixels,
                  pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher)
    if args.naflex_loader:
        from timm.data import create_naflex_loader
        patch_size = getattr(getattr(model, 'embeds', None), 'patch_size', None) or (16, 16)
        return partial(create_naflex_loader, patch_size=patch_size, max_seq_len=args.naflex_max_seq_len, **common)
    return partial(create_loader, input_size=data_config['input_size'], is_training=False,
                   tf_preprocessing=args.tf_preprocessing, **common)


def _clean_scorers(args, dataset):
    """The clean evaluation's extra scorers: ReaL labels and precision / recall / F1, as asked."""
    real = create_real_labels(dataset, args.real_labels) if args.real_labels else None
    metrics = ClassMetrics(args.metrics_avg) if args.metrics_avg else None

    def on_output(logits, target):
        if real is not None:
            real.add_result(logits)
        if metrics is not None:
            metrics.add_result(logits, target)
    return real, metrics, on_output


def _real_label_scores(real, scores: dict) -> dict:
    """``scores`` with top-1 / top-5 replaced by the ReaL-label ones (timm: real labels replace top-k)."""
    return dict(scores, top1=real.get_accuracy(k=1), top5=real.get_accuracy(k=5))


def validate(args) -> OrderedDict:
    """Evaluates one model; returns an ordered dict of results like timm's validate.py, plus attacks."""
    device = torch.device(args.device)
    _prepare_data_args(args)
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    model, base, data_config, crop_pct = create_eval_model(args, device)
    param_count = sum(p.numel() for p in base.parameters())

    amp_autocast = nullcontext
    if args.amp:
        dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type == 'cpu') else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)

    dataset = create_eval_dataset(args, data_config)
    make_loader = _loader_factory(args, data_config, crop_pct, device, base)
    loader = make_loader(dataset)
    eval_kwargs = dict(device=device, amp_autocast=amp_autocast, log_interval=args.log_freq,
                       channels_last=args.channels_last)

    real, metrics, on_output = _clean_scorers(args, dataset)
    clean = evaluate_accuracy(model, loader, log_prefix='Clean', on_output=on_output, **eval_kwargs)
    if real is not None:
        clean = _real_label_scores(real, clean)
    results = OrderedDict(
        model=args.model,
        top1=round(clean['top1'], 4), top1_err=round(100 - clean['top1'], 4),
        top5=round(clean['top5'], 4), top5_err=round(100 - clean['top5'], 4),
        **(metrics.compute() if metrics is not None else {}),
        loss=round(clean['loss'], 6), samples=clean['samples'],
        param_count=round(param_count / 1e6, 4),
        img_size=data_config['input_size'][-1], crop_pct=crop_pct,
        interpolation=data_config['interpolation'],
    )
    report = OrderedDict(model=args.model, dataset=args.dataset or args.data_dir, split=args.split,
                         clean=dict(top1=clean['top1'], top5=clean['top5'], samples=clean['samples']))
    if args.real_labels:
        report['labels'] = 'ImageNet ReaL (clean and --attack top-1/top-5)'
    if args.attack != 'none':
        _evaluate_attacks(args, model, dataset, loader, make_loader, data_config, eval_kwargs, results, report)
    aa_loader = None
    if args.autoattack != 'none':
        if args.aa_image_list or args.protocol:
            names = read_image_list(args.aa_image_list or robustbench_image_list())
            aa_subset = image_list_subset(dataset, names[:args.aa_samples])
        elif args.aa_subset == 'first':
            aa_subset = TransformSubset(dataset, range(min(args.aa_samples, len(dataset))))
        elif args.aa_subset == 'random':
            aa_subset = random_subset(dataset, args.aa_samples, seed=args.seed)
        else:
            aa_subset = spread_subset(dataset, args.aa_samples)
        aa_loader = make_loader(aa_subset)
    _evaluate_robustness(args, model, base, data_config, aa_loader, device, results, report, amp_autocast=amp_autocast)
    if args.report_dir:
        save_report(report, args.report_dir, plots=not args.no_plots)
    results['report'] = report
    return results


def _evaluate_attacks(args, model, dataset, loader, make_loader, data_config, eval_kwargs, results, report) -> None:
    """FGSM / PGD top-1 at each --eps (and the kNN-guided attack with --knn), on --attack-samples images."""
    attack_loader, attack_set = loader, dataset
    if args.attack_samples is not None and args.attack_samples < len(dataset):
        attack_set = spread_subset(dataset, args.attack_samples)
        attack_loader = make_loader(attack_set)
        real = create_real_labels(attack_set, args.real_labels) if args.real_labels else None
        subset_clean = evaluate_accuracy(model, attack_loader, log_prefix='Clean subset',
                                         on_output=real and (lambda logits, _: real.add_result(logits)), **eval_kwargs)
        if real is not None:
            subset_clean = _real_label_scores(real, subset_clean)
        results['attack_subset_top1'] = round(subset_clean['top1'], 4)
        report['attack_subset_clean'] = dict(top1=subset_clean['top1'], samples=subset_clean['samples'])
    results['attack_samples'] = len(attack_loader.dataset)
    results['attack'] = args.attack
    results['norm'] = args.norm
    results['steps'] = 1 if args.attack == 'fgsm' else args.steps
    results['restarts'] = 1 if args.attack == 'fgsm' else args.restarts
    # a line after each eps with the time left (one eps: its batches report progress)
    progress = ProgressLog(len(args.eps), f'{args.attack.upper()} accuracy vs eps', unit='eps',
                           interval=0 if len(args.eps) > 1 else None)
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
        if args.knn:
            _evaluate_knn_attacks(args, model, eps, attack, attack_loader, eval_kwargs, results, report)
            progress.update(detail=f'eps={eps:.4g} done')
            continue
        real = create_real_labels(attack_set, args.real_labels) if args.real_labels else None
        adv = evaluate_accuracy(model, attack_loader, attack=attack, log_prefix=f'Attack eps={eps:.4g}',
                                on_output=real and (lambda logits, _: real.add_result(logits)), **eval_kwargs)
        if real is not None:
            adv = _real_label_scores(real, adv)
        results[_attack_key(args, eps)] = round(adv['top1'], 4)
        report.setdefault('pgd', []).append(dict(
            attack=args.attack, eps=eps, norm=args.norm, steps=attack.steps, step_size=attack.step_size,
            restarts=attack.restarts, samples=adv['samples'], top1=adv['top1']))
        progress.update(detail=f'eps={eps:.4g} done')
    results['eps'] = ' '.join(f'{e:.6g}' for e in args.eps)


def _evaluate_knn_attacks(args, knn, eps, attack, loader, eval_kwargs, results, report) -> None:
    """kNN top-1 under PGD through the soft vote, under the guided attack on the representation (same eps,
    steps and step size, one restart, true label as reference) and under the per-sample worst case of both."""
    if args.restarts > 1:
        _logger.warning('--restarts applies to the PGD through the soft vote; the guided attack runs one restart.')
    attacks = knn_attacks(attack, num_guides=args.knn_guides, guide_mode=args.knn_guide_mode)
    _logger.info(f'Attacking with {attacks["guided"]}; robust accuracy is the per-sample worst case of both attacks')
    adv = evaluate_knn_robustness(knn, loader, attacks, device=eval_kwargs.get('device'),
                                  amp_autocast=eval_kwargs.get('amp_autocast', nullcontext),
                                  channels_last=eval_kwargs.get('channels_last', False))
    key = _attack_key(args, eps)
    pgd_name = args.attack if args.attack == 'fgsm' else 'pgd'
    results[key] = round(adv['softvote_top1'], 4)
    results[key.replace(pgd_name, 'knn_guided', 1)] = round(adv['guided_top1'], 4)
    results[key.replace(pgd_name, 'knn_worst', 1)] = round(adv['worst_top1'], 4)
    _logger.info(f'kNN eps={eps:.4g}: soft-vote {args.attack} {adv["softvote_top1"]:.2f}, guided '
                 f'{adv["guided_top1"]:.2f}, worst case {adv["worst_top1"]:.2f} ({adv["samples"]} samples)')
    report.setdefault('pgd', []).append(dict(
        attack=args.attack, eps=eps, norm=args.norm, steps=attack.steps, step_size=attack.step_size,
        restarts=attack.restarts, samples=adv['samples'], top1=adv['softvote_top1']))
    report.setdefault('knn_guided', []).append(dict(eps=eps, steps=attacks['guided'].steps,
                                                    guides=attacks['guided'].num_guides, samples=adv['samples'],
                                                    top1=adv['guided_top1']))
    report.setdefault('knn_worst', []).append(dict(eps=eps, samples=adv['samples'], top1=adv['worst_top1']))


def _evaluate_robustness(args, model, base, data_config, aa_loader, device, results, report,
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
        aa['subset'] = ('listed images' if args.aa_image_list or args.protocol else
                        'first' if args.aa_subset == 'first' else
                        f'random (seed {args.seed})' if args.aa_subset == 'random' else 'evenly spaced')
        if args.protocol:
            aa['protocol'] = PROTOCOLS[args.protocol]['description']
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
                                          label_names=base.pretrained_cfg.get('label_names'), **corruption_kwargs)
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


def format_bulk_table(rows: list) -> str:
    """A markdown table with one row per model and the union of the rows' columns."""
    columns = list(OrderedDict((k, None) for row in rows for k in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(str(row.get(c, '')) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


def validate_bulk(args, models) -> list:
    """timm's bulk mode: one results row per ``(model, checkpoint)``, best clean top-1 first.

    A model that fails (unknown name, missing weights, out of memory after the batch-size retries) is
    logged and left out, like timm; the failures are returned in ``args.bulk_failures``.
    """
    _logger.info(f'Running bulk validation on these models: {", ".join(m + (" " + c if c else "") for m, c in models)}')
    if args.report_dir:
        _logger.info(f'--report-dir: one subfolder per model under {args.report_dir}')
    rows, failures = [], []
    try:
        for name, checkpoint in models:
            run_args = copy.copy(args)  # validate() fills dataset and bank defaults per model
            run_args.model, run_args.checkpoint = name, checkpoint
            run_args.pretrained = not (checkpoint or args.no_pretrained)
            if args.report_dir:
                tag = os.path.basename(checkpoint) if checkpoint else name
                run_args.report_dir = os.path.join(args.report_dir, re.sub(r'[^\w.-]+', '_', tag))
            row = run_with_retry(partial(validate, run_args), run_args, args.batch_size)
            if 'error' in row:
                failures.append(row)
                continue
            if checkpoint:
                row['checkpoint'] = checkpoint
            rows.append(row)
    except KeyboardInterrupt:
        _logger.warning(f'Interrupted: results of the {len(rows)} models done so far.')
    args.bulk_failures = failures
    return sorted(rows, key=lambda r: r['top1'], reverse=True)


def main(argv=None):
    """Validates one model (a results dict) or, in bulk mode, a list of them (a list of results dicts)."""
    utils.setup_default_logging()
    args = parse_args(argv)
    try:
        models = list_bulk_models(args.model, args.checkpoint)
        if models:
            _prepare_data_args(args)  # a missing folder or package fails once, not once per model
            if args.retry:
                _logger.warning('--retry: bulk runs always retry with smaller batches; the flag changes nothing.')
            results = validate_bulk(args, models)
        elif args.retry:
            results = run_with_retry(partial(validate, args), args, args.batch_size)
        else:
            results = validate(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f'validate.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    rows = results if isinstance(results, list) else [results]
    reports = [row.pop('report') for row in rows if 'report' in row]
    if isinstance(results, list):
        print(format_bulk_table(rows))
        for failure in args.bulk_failures:
            print(f'validate.py: {failure["model"]} failed: {failure["error"]}', file=sys.stderr)
    else:
        print(format_table(results))
        if reports and any(k in reports[0] for k in ('autoattack', 'corruptions', 'shift')):  # beyond the table
            print(report_to_markdown(reports[0]))
    print(f'--result\n{json.dumps(results, indent=4)}')
    if args.results_file:
        write_results(args.results_file, results, format=args.results_format)
    return results


if __name__ == '__main__':
    main()

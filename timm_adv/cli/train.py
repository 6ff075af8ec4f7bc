"""timm-adv training: timm's train.py flags plus ``--adv-*`` adversarial training.

Built from timm's library pieces (create_model, create_dataset/create_loader, create_optimizer_v2,
create_scheduler_v2, ModelEmaV3 through the task, CheckpointSaver, timm.task). An adversarial
method is a timm task chosen with ``--adv-method``; everything else reads like a timm command:

    python train.py --model resnet10t --adv-method pgd --adv-eps 8/255 --adv-steps 7 --epochs 8
    timm-adv-train --model resnet10t --adv-method pgd --adv-eps 8/255 --adv-steps 7 --epochs 8  # installed

Without ``--data-dir`` / ``--dataset`` it trains on the bundled offline dataset ``bundled/mnist``.
Distributed training: ``torchrun --nproc_per_node N train.py ...`` (gloo on CPU, nccl on CUDA).
"""
import argparse
import importlib
import logging
import os
import sys
import time
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torchvision
import yaml

from timm import utils
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
from timm.models import create_model, load_checkpoint, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.scheduler.scheduler import Scheduler
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint

from timm_adv.attacks import PGDAttack, create_attack, unwrap_ddp
from timm_adv.data import (DEFAULT_DATASET, TrainLoaders, UnreadableImageError, apply_bundled_defaults,
                           apply_dataset_recipe, create_train_loaders, default_workers, format_recipe, is_bundled,
                           is_fine_tuning, is_iterable_dataset, resolve_dataset_name, set_loader_epoch,
                           unreadable_image_message)
from timm_adv.evaluation import (OverfitGuard, add_overfit_guard_args, check_overfit_guard_args, create_overfit_guard,
                                 evaluate_accuracy, evaluate_robust_accuracy, validation_protocol)
from timm_adv.loss import create_train_criterion
from timm_adv.models import load_mae_weights, resolve_mae_weights, warn_mae_normalisation
from timm_adv.tasks import AdversarialTask, add_adv_args, check_adv_args, create_task, get_method
from timm_adv.tasks.distill import create_teacher, prepare_kd_model
from timm_adv.tasks.arg_types import bounded_type
from timm_adv.utils import (CheckpointError, CheckpointWriteError, Preempted, PreemptionHandler, RecoverySaver,
                            ResumableBatches, atomic_write, check_compile_args, check_layer_decay,
                            check_state_dict_matches, check_timm_args, check_writable, checkpoint_position,
                            checkpoint_state_dict, create_wandb_logger, explicit_args, gather_rng_states,
                            init_distributed_device, read_checkpoint, resolve_auto_resume, save_recovery, scrub,
                            set_rng_state, split_config_keys, start_epoch_rng, sync_lookahead)

_logger = logging.getLogger('train')

config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments (a timm args.yaml works)')


def build_parser() -> argparse.ArgumentParser:
    """The train.py parser: timm's train.py argument groups in timm's order (dataset, model, device, optimizer,
    LR schedule, augmentation, batch norm, EMA, miscellaneous, variable resolution, NaFlex), then ours
    (adversarial training with each method's flags, knowledge distillation, the catastrophic-overfitting guard).

    ``-c/--config`` is ``config_parser``'s, read first; :func:`parse_args` adds the config, the dataset recipe
    and the checks of flag combinations.

    Example:
        >>> build_parser().parse_args(['--adv-method', 'pgd']).adv_steps is None  # unset: the method's default
        True
    """
    parser = argparse.ArgumentParser(description='timm-adv ImageNet-style training with adversarial methods')
    for add_group in (_add_dataset_args, _add_model_args, _add_device_args, _add_optimizer_args, _add_schedule_args,
                      _add_augmentation_args, _add_batch_norm_args, _add_ema_args, _add_misc_args,
                      _add_variable_resolution_args, _add_naflex_args, add_adv_args, add_overfit_guard_args):
        add_group(parser)
    return parser


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help=f'dataset type + name ("<type>/<name>") (default: ImageFolder with --data-dir, '
                            f'{DEFAULT_DATASET} without)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split (default: validation)')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                       help='samples in the train split: sets the length of streaming datasets (as timm), or trains '
                            'on an evenly spread subset of N samples of a map-style one')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                       help='samples in the validation split (streaming: its length; map-style: a spread subset)')
    group.add_argument('--dataset-download', action='store_true', default=False, help='allow download of dataset for torch/ datasets')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode for input images')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels')
    group.add_argument('--skip-bad-images', action='store_true', default=False,
                       help='skip (and count) image files that cannot be decoded; default: stop at the first, naming it')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow Hugging Face datasets that run their own code (trust_remote_code)')


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet10t', type=str, metavar='MODEL', help='name of model to train (default: resnet10t)')
    group.add_argument('--pretrained', action='store_true', default=False, help='start with pretrained version of specified network (if avail)')
    group.add_argument('--pretrained-path', default=None, type=str, help='load this checkpoint as if it were the pretrained weights (with adaptation)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='load this checkpoint into model after initialization (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume full model and optimizer state from checkpoint; "auto": the newest valid last or '
                            'recovery checkpoint of --output/--experiment, a fresh start if none (default: none)')
    group.add_argument('--no-resume-opt', action='store_true', default=False, help='prevent resume of optimizer state when resuming model')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of label classes (model default if None)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if None)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: None => model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels (default: None => 3)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N', help='input dimensions (d h w)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override std deviation of dataset')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='input batch size for training (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N', help='validation batch size override (default: None)')
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--fuser', default='', type=str, help="select jit fuser (with --torchscript). One of ('', 'te', 'old', 'nvfuser')")
    group.add_argument('--grad-accum-steps', type=bounded_type('--grad-accum-steps', int, 1), default=1, metavar='N',
                       help='accumulate gradients over N batches per optimizer step (default: 1)')
    group.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    group.add_argument('--grad-checkpointing', action='store_true', default=False, help='enable gradient checkpointing through model blocks/stages')
    group.add_argument('--head-init-scale', default=None, type=float, help='multiply the classifier head weights and bias by this')
    group.add_argument('--head-init-bias', default=None, type=float, help='set the classifier head bias to this value')
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None).')
    # scripting / codegen
    scripting_group = group.add_mutually_exclusive_group()
    scripting_group.add_argument('--torchscript', action='store_true', default=False, help='torch.jit.script the full model')
    scripting_group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                                 help='Enable compilation w/ specified backend (default: inductor).')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str, help='device to use for training')
    group.add_argument('--amp', action='store_true', default=False, help='use mixed precision training')
    group.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16; bfloat16 on CPU)')
    group.add_argument('--model-dtype', default=None, type=str, help='model dtype override (non-AMP): float32, bfloat16 or float16')
    group.add_argument('--no-ddp-bb', action='store_true', default=False, help='force broadcast buffers for native DDP to off')
    group.add_argument('--synchronize-step', action='store_true', default=False, help='torch.cuda.synchronize() at the end of each step')
    group.add_argument('--local_rank', '--local-rank', default=0, type=int)
    group.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend (default: nccl on CUDA, gloo on CPU)')
    group.add_argument('--device-modules', default=None, type=str, nargs='+', help='Python imports for device backend modules')


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay (default: None)')
    group.add_argument('--layer-decay-min-scale', type=float, default=0, help='layer-wise lr decay minimum scale clamp (default: 0)')
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                       help='layer-wise lr decay scale below which parameters are frozen (not optimised) (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine"')
    group.add_argument('--sched-on-updates', action='store_true', default=False, help='apply LR scheduler step on update instead of epoch end')
    group.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size (divisor, default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='learning rate noise limit percent (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='learning rate noise std-dev (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='learning rate cycle len multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly (default: 1.0)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='epoch repeat multiplier (number of times to repeat a streaming dataset per train epoch)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES', help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False, help='exclude warmup period from decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate (default: 0.1)')


def _add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation, override other train aug args')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop-mode in train')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO', help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor (default: 0.4)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT', help='probability of applying any color jitter')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT', help='probability of applying random grayscale')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT', help='probability of applying gaussian blur')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='use AutoAugment policy. "v0" or "original". (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0, help='number of augmentation repetitions (distributed training only) (default: 0)')
    group.add_argument('--aug-splits', type=int, default=0, help='number of augmentation splits (AugMix; 0 off, >= 2 on) (default: 0)')
    group.add_argument('--jsd-loss', action='store_true', default=False, help='Jensen-Shannon divergence + CE loss; use with --aug-splits')
    group.add_argument('--bce-loss', action='store_true', default=False, help='enable BCE loss w/ mixup/cutmix/smoothing use')
    group.add_argument('--bce-sum', action='store_true', default=False, help='sum over classes when using BCE loss')
    group.add_argument('--bce-target-thresh', type=float, default=None, help='threshold for binarizing softened BCE targets (default: None, disabled)')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='positive weighting for BCE loss')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False, help='do not random erase first (clean) augmentation split')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', help='how to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N', help='turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random', help='training interpolation (random, bilinear, bicubic default: "random")')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
    group.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='drop connect rate, DEPRECATED, use --drop-path')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate (default: None)')


def _add_batch_norm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Batch norm parameters', 'only works with gen_efficientnet based models currently')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action='store_true', help='enable NVIDIA Apex or Torch synchronized BatchNorm.')
    group.add_argument('--dist-bn', type=str, default='reduce', help='distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')
    group.add_argument('--split-bn', action='store_true', help='enable separate BN layers per augmentation split (with --aug-splits)')


def _add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='enable tracking moving average of model weights.')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='enable warmup for model EMA decay.')


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='how many batches to wait before logging training status')
    group.add_argument('--val-interval', type=int, default=1, metavar='N', help='how many epochs between validation and checkpointing')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many optimizer updates to wait before writing recovery checkpoint (a SIGTERM or '
                            'SIGUSR1 writes one too)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=default_workers(4), metavar='N',
                       help='data loading processes (default: 4, at most the CPUs available to this process)')
    group.add_argument('--save-images', action='store_true', default=False, help='save images of input batches every log interval for debugging')
    group.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH', help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment, name of sub-folder for output')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='best metric (default: "top1"; "pgd_top1" ranks by robust accuracy)')
    group.add_argument('--tta', type=int, default=0, metavar='N', help='test/inference time augmentation (oversampling) factor; only 0 (off) here')
    group.add_argument('--use-multi-epochs-loader', action='store_true', default=False, help='use the multi-epochs-loader to save time at the beginning of every epoch')
    group.add_argument('--log-wandb', action='store_true', default=False, help='log training and validation metrics to wandb (extra: timm-adv[wandb])')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')
    group.add_argument('--wandb-resume-id', default='', type=str, metavar='ID', help='if resuming a run, the id of the run in wandb')


def _add_variable_resolution_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Variable-resolution training parameters')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None,
                       help='training image sizes sampled per batch (timm scheduled loader; default: off)')
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None, help='batch size for each --train-img-sizes entry')
    group.add_argument('--train-size-probs', type=float, nargs='+', default=None, help='base sampling weights for --train-img-sizes (default: uniform)')
    group.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'),
                       help='resolution choice schedule; progressive moves from the first size to the last')
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65, help='progressive schedule spread (default: 0.65)')
    group.add_argument('--train-size-random-mix', type=float, default=0.1, help='progressive schedule random mix (default: 0.1)')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                       help='fixed loader batches (before gradient accumulation) per epoch; inferred if unspecified')
    group.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'),
                       help='scale gradients relative to the policy-average scheduled batch size')


def _add_naflex_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('NaFlex loader parameters (refused: attacks perturb image tensors)')
    group.add_argument('--naflex-loader', action='store_true', default=False, help='use NaFlex loader (not supported with timm-adv)')
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024], help='NaFlex train sequence lengths')
    group.add_argument('--naflex-max-seq-len', type=int, default=576, help='NaFlex validation sequence length')
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None, help='NaFlex variable patch sizes')
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None, help='NaFlex patch size probabilities')
    group.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'), help='NaFlex loss scaling')
    group.add_argument('--naflex-patchify-channels-first', action='store_true', default=False, help='NaFlex patchify channel order')


def parse_args(argv=None):
    """Parses ``argv`` the way timm's train.py does: a YAML config sets defaults, flags override."""
    parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    cfg = {}
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser.error(f'-c/--config {args_config.config!r}: no such file.')
        with open(args_config.config, 'r') as f:
            raw = yaml.safe_load(f) or {}
        cfg, skipped, refused = split_config_keys(raw, {a.dest for a in parser._actions})
        if refused:
            parser.error(f'-c {args_config.config}: keys that set a recipe this train.py does not support: '
                         f'{", ".join(f"{k}={raw[k]!r}" for k in refused)}. Remove them from '
                         f'the file (or set them to null/false) to train without them.')
        if skipped:
            _logger.info(f'-c {args_config.config}: skipped run-time or unset keys: {", ".join(skipped)}')
    explicit = explicit_args(parser, remaining, config=cfg, config_name=f'-c {args_config.config}')
    parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    # every key of a -c config counts as given: an args.yaml reproduces its run, recipe or not
    _apply_recipe(args, set(explicit) | set(cfg))
    try:
        check_adv_args(args, explicit)
        check_overfit_guard_args(args, explicit)
        check_compile_args(args.torchcompile, args.torchcompile_mode)
        check_timm_args(args, explicit, bundled=is_bundled(resolve_dataset_name(args)),
                        iterable=is_iterable_dataset(args.dataset))
    except ValueError as e:
        parser.error(str(e))
    if 'pgd_top1' in args.eval_metric:
        _logger.warning(
            f'--eval-metric {args.eval_metric} picks model_best.pth.tar by robust accuracy on --val-split '
            f'{args.val_split!r}: figures reported on that same split are then optimistically biased (a test-set '
            f'selection leak). Select on a held-out split (e.g. --val-split holdout carved from the training data) '
            f'and report on the test split with validate.py --split.')
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


def _apply_recipe(args, explicit) -> None:
    """Fills flags the user did not give (command line or ``-c``) with the dataset's recipe, and says so."""
    applied = apply_dataset_recipe(args, explicit)
    if applied is not None and int(os.environ.get('RANK', 0)) == 0:
        _logger.info(format_recipe(resolve_dataset_name(args), applied, fine_tuning=is_fine_tuning(args)))


def _resume_rng_state(args, resume_ckpt):
    # this process's random state saved with the checkpoint (timm_adv.utils.rng): --resume replays the run
    states = (resume_ckpt.get('saver') or {}).get('rng_states') if isinstance(resume_ckpt, dict) else None
    if states is None:
        return None
    if len(states) != args.world_size:
        _logger.warning(f'--resume: the checkpoint holds the random state of {len(states)} processes, this run has '
                        f'{args.world_size}; it continues on fresh random streams (no exact replay).')
        return None
    return states[args.rank]


def _check_paths(args) -> None:
    if args.resume and not os.path.isfile(args.resume):
        raise CheckpointError(f'--resume {args.resume!r}: no such file; give the last.pth.tar of the run to continue '
                              f'(or --resume auto with its --experiment).')
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise CheckpointError(f'--initial-checkpoint {args.initial_checkpoint!r}: no such file.')
    if args.pretrained_path and not os.path.exists(args.pretrained_path):
        raise CheckpointError(f'--pretrained-path {args.pretrained_path!r}: no such file.')
    if args.pretrained_path and not args.pretrained:
        raise ValueError('--pretrained-path replaces the pretrained weights, as in timm, and needs --pretrained; '
                         'add --pretrained, or load the file with --initial-checkpoint.')
    if args.data_dir and not is_bundled(args.dataset) and not os.path.exists(args.data_dir) and not args.dataset_download:
        raise FileNotFoundError(f'--data-dir {args.data_dir!r} does not exist; point it at your dataset, or omit '
                                f'--data-dir/--dataset to use the bundled dataset {DEFAULT_DATASET}.')


def _output_dir(args, data_config) -> str:
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    output_dir = os.path.join(args.output or './output/train', exp_name)
    last = os.path.join(output_dir, 'last.pth.tar')
    if os.path.exists(last) and not (args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)),
                                                                       output_dir)):
        raise ValueError(f'--output/--experiment: {output_dir!r} already holds a run (last.pth.tar). Pass '
                         f'--resume {last} to continue it, or choose another --experiment; nothing was overwritten.')
    check_writable(output_dir, '--output')  # now, not after the first epoch
    return output_dir


def _amp_setup(args, device):
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if (args.amp_dtype == 'bfloat16' or device.type == 'cpu') else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
    loss_scaler = utils.NativeScaler(device=device.type) if dtype == torch.float16 else None
    return amp_autocast, loss_scaler


def _init_head(model: nn.Module, args) -> None:
    # timm train.py's --head-init-scale / --head-init-bias
    if args.head_init_scale is None and args.head_init_bias is None:
        return
    head = model.get_classifier()
    if getattr(head, 'weight', None) is None or getattr(head, 'bias', None) is None:
        raise ValueError(f'--head-init-scale/--head-init-bias: {args.model!r} has no classifier head with weight and '
                         f'bias to initialise (num_classes {model.num_classes}).')
    with torch.no_grad():
        if args.head_init_scale is not None:
            head.weight.mul_(args.head_init_scale)
            head.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            head.bias.fill_(args.head_init_bias)


def setup_device(args):
    """Device phase: distributed init, seeds, backend switches; returns ``(device, model_dtype)``."""
    for module in args.device_modules or ():
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f'--device-modules {module}: cannot import it ({e}); install the backend package.') from e
    if torch.cuda.is_available():  # timm's train.py speed defaults
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = init_distributed_device(args)  # timm's, restart-safe under torchrun
    if args.distributed:
        _logger.info(f'Training in distributed mode, process {args.rank}/{args.world_size}, device {device}.')
    utils.random_seed(args.seed, args.rank)
    if args.fuser:
        utils.set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    return device, getattr(torch, args.model_dtype) if args.model_dtype else None


def create_train_model(args, mae_weights, device, model_dtype=None):
    """Model phase: the timm model with the method's changes, on its device; returns ``(model, data_config,
    teacher)``, the teacher (``--kd-model-name``, in ``--model-dtype``, else None) built and loaded once."""
    mae_flag = mae_weights.flag if mae_weights is not None else ''
    factory_kwargs = {}
    if args.pretrained_path and mae_flag != '--pretrained-path':
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    mae_first = mae_flag in ('--pretrained', '--pretrained-path')  # MAE weights first, the initial checkpoint over them
    checkpoint_path = (args.initial_checkpoint if mae_weights is None else '') or None
    try:
        model = create_model(
            args.model,
            pretrained=args.pretrained and not mae_first,
            in_chans=args.in_chans or 3,
            num_classes=args.num_classes,
            drop_rate=args.drop,
            drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block,
            global_pool=args.gp,
            bn_momentum=args.bn_momentum,
            bn_eps=args.bn_eps,
            scriptable=args.torchscript,
            checkpoint_path=checkpoint_path,
            **factory_kwargs,
            **args.model_kwargs,
        )
    except RuntimeError as e:  # timm loads --initial-checkpoint strictly: weights of another model are bad input
        if checkpoint_path is None or 'state_dict' not in str(e):
            raise
        raise CheckpointError(f'--initial-checkpoint {checkpoint_path!r} does not fit --model {args.model} '
                              f'({" ".join(str(e).split())[:240]}...). Give weights of the same --model and '
                              f'--num-classes.') from None
    if args.num_classes is None:
        if model.num_classes == 0:  # timm's .mae tags carry num_classes=0: CE would run on pooled features
            raise ValueError(f'--model {args.model} is built without a classifier (num_classes 0 in its pretrained '
                             f'config); give --num-classes N, the number of classes of your dataset.')
        args.num_classes = model.num_classes
    if mae_weights is not None:
        load_mae_weights(model, mae_weights, model_name=args.model)
        if mae_first and args.initial_checkpoint:
            load_checkpoint(model, args.initial_checkpoint)
    _init_head(model, args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    if utils.is_primary(args):
        warn_mae_normalisation(mae_weights, data_config['mean'], args.model)

    teacher = create_teacher(args, model, device, model_dtype) if args.kd_model_name else None
    model = prepare_kd_model(get_method(args.adv_method).prepare_model(model, args), args, teacher)  # + KD projection
    if args.split_bn:  # AugMix: BN statistics per split (clean, augmented...)
        model = convert_splitbn_model(model, args.aug_splits)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
    model.to(device=device, dtype=model_dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchscript:
        model = torch.jit.script(model)
    return model, data_config, teacher


def create_train_optimizer(args, model, batch_size_reference: float):
    """Optimisation phase: lr scaled by the global batch size as timm does, then timm's optimizer."""
    if args.lr is None:
        global_batch_size = batch_size_reference * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    check_layer_decay(optimizer, args.layer_decay, args.model)
    return optimizer


def create_train_task(args, model, criterion, data_config, device, optimizer, loss_scaler, resume_ckpt, teacher=None):
    """Task phase: the method's task, its EMA, and the resumed state; returns ``(task, start_epoch)``.

    The task is final here (compiled, if ever, after this phase and before DDP wrapping, as in timm).
    """
    task = create_task(model, criterion, args, mean=data_config['mean'], std=data_config['std'], device=device,
                       teacher=teacher)
    task.to(device)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
    start_epoch = 0
    if resume_ckpt is not None:
        # compare with what this task writes: a task may keep part of its model out of ``state_dict``
        check_state_dict_matches(checkpoint_state_dict(resume_ckpt), task.get_checkpoint_state()['state_dict'],
                                 '--resume', arch=resume_ckpt.get('arch', '') if isinstance(resume_ckpt, dict) else '')
        task.resume_optimizer_state = not args.no_resume_opt  # method optimisers too (FGSM-SDI's generator)
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args)) or 0
        if task.has_ema():
            load_task_ema_checkpoint(task, args.resume)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    return task, start_epoch


def compile_task(args, task) -> None:
    """Compile phase (``--torchcompile``): before DDP wrapping, as timm does, so DDP stays out of the graph
    and validation uses the compiled model."""
    if not args.torchcompile:
        return
    if utils.is_primary(args):
        _logger.info(f'Compiling task components with backend={args.torchcompile}, mode={args.torchcompile_mode}')
    task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    if task.has_ema():
        task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)


def setup_distributed(args, task, device) -> None:
    """Distributed phase: DDP around the task's trainable module."""
    if args.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None, **ddp_kwargs)


def create_train_schedule(args, optimizer, loader_train, start_epoch: int, start_batch: int = 0):
    """Schedule phase: timm's scheduler, stepped to ``start_epoch`` (and ``start_batch`` loader batches into it);
    returns ``(lr_scheduler, num_epochs)``."""
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    if start_epoch > 0 or start_batch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch + start_batch // args.grad_accum_steps)
        else:
            lr_scheduler.step(start_epoch)
    return lr_scheduler, num_epochs


def create_robust_validation(args, data_config, loader_robust, device, amp_autocast):
    """Robust-validation phase: the per-epoch PGD attack and the catastrophic-overfitting guard."""
    val_eps = args.adv_val_eps or args.adv_eps or get_method(args.adv_method).attack_defaults.get('eps', 8 / 255)
    val_attack = create_attack(eps=val_eps, steps=args.adv_val_steps, norm=args.adv_norm or 'linf',
                               random_start=True, bn_mode='eval', mean=data_config['mean'], std=data_config['std'])
    overfit_guard = create_overfit_guard(args, loader_robust, val_attack, mean=data_config['mean'],
                                         std=data_config['std'], device=device, amp_autocast=amp_autocast)
    return val_attack, overfit_guard


@dataclass
class TrainSetup:
    """What :func:`setup` builds and :func:`train` runs.

    Attributes:
        device: The process's device.
        task: The method's task (compiled with ``--torchcompile``, its trainable module DDP-wrapped when
            distributed).
        optimizer: timm's optimizer over the task's trainable parameters.
        amp_autocast: Context-manager factory: ``torch.autocast`` with the AMP dtype, or ``nullcontext``.
        loss_scaler: timm's ``NativeScaler`` under float16 AMP, else None.
        loaders: Training, validation and robust-validation loaders, mixup and the reference batch size.
        lr_scheduler: timm's scheduler, stepped to where the run starts.
        num_epochs: Epochs of the schedule (timm's ``create_scheduler_v2``, cooldown included).
        start_epoch: First epoch to run (0, or where a resumed checkpoint stopped).
        output_dir: The run's folder (primary process only, else None).
        data_config: timm's resolved data config (input size, mean, std, ...).
        val_attack: The per-epoch robust-validation PGD attack.
        overfit_guard: The catastrophic-overfitting guard, or None.
        resume_position: A recovery checkpoint's epoch and batches done (the run continues mid-epoch), or None.
        resume_rng: This process's random state saved with the resumed checkpoint, or None.
        preemption: The signal handler while :func:`main` trains, else None.

    Example:
        >>> args, _ = parse_args(['--model', 'resnet10t', '--epochs', '1'])
        >>> state = setup(args)
        >>> train(args, state)  # epochs state.start_epoch .. state.num_epochs - 1
    """
    device: torch.device
    task: AdversarialTask
    optimizer: torch.optim.Optimizer
    amp_autocast: Callable
    loss_scaler: Optional[utils.NativeScaler]
    loaders: TrainLoaders
    lr_scheduler: Scheduler
    num_epochs: int
    start_epoch: int
    output_dir: Optional[str]
    data_config: dict
    val_attack: PGDAttack
    overfit_guard: Optional[OverfitGuard]
    resume_position: Optional[dict]
    resume_rng: Optional[dict]
    preemption: Optional[PreemptionHandler] = None


def setup(args) -> TrainSetup:
    """Everything before the first epoch, phase by phase as in timm's train.py."""
    args.resume = resolve_auto_resume(args.resume, args.output, args.experiment)
    _check_paths(args)
    resume_ckpt = read_checkpoint(args.resume, '--resume') if args.resume else None
    position = checkpoint_position(resume_ckpt)  # a recovery checkpoint continues mid-epoch
    # reads --initial-checkpoint / --pretrained-path once (an early check of the files); MAE pre-training
    # weights are loaded by timm_adv.models.mae, anything else by timm as usual
    mae_weights = resolve_mae_weights(args.model, args.pretrained, args.pretrained_path, args.initial_checkpoint)
    device, model_dtype = setup_device(args)
    args.data_dir = args.data_dir or args.data
    args.dataset = resolve_dataset_name(args)
    apply_bundled_defaults(args)

    model, data_config, teacher = create_train_model(args, mae_weights, device, model_dtype)
    loaders = create_train_loaders(args, data_config, device, model_dtype)
    optimizer = create_train_optimizer(args, model, loaders.batch_size_reference)
    amp_autocast, loss_scaler = _amp_setup(args, device)
    output_dir = _output_dir(args, data_config) if utils.is_primary(args) else None

    criterion = create_train_criterion(args, loaders.mixup_active, loaders.num_aug_splits).to(device)
    task, start_epoch = create_train_task(args, model, criterion, data_config, device, optimizer, loss_scaler,
                                          resume_ckpt, teacher)
    resume_rng = _resume_rng_state(args, resume_ckpt)
    del resume_ckpt
    if position is not None and args.start_epoch is None:
        start_epoch = position['epoch']
    compile_task(args, task)
    setup_distributed(args, task, device)
    lr_scheduler, num_epochs = create_train_schedule(args, optimizer, loaders.train, start_epoch,
                                                     position['batches'] if position else 0)

    val_attack, overfit_guard = create_robust_validation(args, data_config, loaders.robust, device, amp_autocast)
    return TrainSetup(
        device=device, task=task, optimizer=optimizer, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
        loaders=loaders, lr_scheduler=lr_scheduler, num_epochs=num_epochs, start_epoch=start_epoch,
        output_dir=output_dir, data_config=data_config, val_attack=val_attack, overfit_guard=overfit_guard,
        resume_position=position, resume_rng=resume_rng,
    )


def _batch_loss_scale(args, batch_size: int, batch_size_reference: float) -> float:
    # timm's --variable-batch-loss-scale: a scheduled batch's weight relative to the policy-average batch
    if args.train_img_sizes is None or args.variable_batch_loss_scale == 'none':
        return 1.0
    scale = batch_size / batch_size_reference
    return scale ** 0.5 if args.variable_batch_loss_scale == 'sqrt' else scale


def train_one_epoch(epoch, task, loader, optimizer, args, device, lr_scheduler=None, amp_autocast=nullcontext,
                    loss_scaler=None, mixup_fn=None, saver=None, output_dir=None, batch_size_reference=None,
                    preemption=None, position=None, epoch_rng=None):
    """One epoch of ``task`` training; returns the averaged loss and every scalar metric the task reported,
    and the step cost (``update_s``: seconds per optimizer update, ``sample_ms``: milliseconds per sample).

    With ``--grad-accum-steps N`` (timm's meaning) the optimizer steps every N batches on the sum of
    the batches' losses divided by N (the last, shorter group of an epoch divides by its own size);
    the task, and so its attack, still runs per batch; under DDP the first N-1 backward passes of a
    group skip the gradient all-reduce (``no_sync``); EMA and the scheduler count optimizer updates.
    timm's ``--recovery-interval``, ``--save-images``, ``--synchronize-step`` and
    ``--variable-batch-loss-scale`` act here as in timm's loop.

    ``position`` (from a recovery checkpoint) continues the epoch at its next batch; after each update
    a signal caught by ``preemption`` writes a recovery checkpoint and raises :class:`Preempted`. As in
    timm, a second-order optimizer (``--opt adahessian``) gets ``create_graph``, a lookahead optimizer syncs its slow weights at the
    end of the epoch, before validation and saving (``timm_adv.utils.sync_lookahead``), and under DDP
    the returned metrics (and the logged loss) are averaged over the processes.
    """
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if not args.no_prefetcher and getattr(loader, 'mixup_enabled', None) is not None:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    task.train()
    meters = defaultdict(utils.AverageMeter)
    update_time = utils.AverageMeter()
    num_batches = len(loader)
    accum_steps = args.grad_accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    last_group_start = num_batches - num_batches % accum_steps  # first batch of a shorter final group
    num_updates = epoch * updates_per_epoch + (position['batches'] // accum_steps if position else 0)
    update_samples = 0
    epoch_samples = 0
    second_order = getattr(optimizer, 'is_second_order', False)
    end = time.time()
    optimizer.zero_grad(set_to_none=True)
    batches = ResumableBatches(loader, position, args.rank, epoch_rng)
    for batch_idx, (input, target) in batches:
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        group_size = num_batches % accum_steps if batch_idx >= last_group_start else accum_steps
        if args.no_prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        with task.no_sync() if args.distributed and not need_update else nullcontext():
            with amp_autocast():
                result = task(input, target)
            loss = result['loss'] / group_size if group_size > 1 else result['loss']
            loss = loss * _batch_loss_scale(args, input.shape[0], batch_size_reference or args.batch_size)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                            create_graph=second_order, need_update=need_update)
            else:
                loss.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                                                 value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        n = input.shape[0]
        update_samples += n * args.world_size
        epoch_samples += n
        for key, value in result.items():
            if key != 'output' and torch.is_tensor(value) and value.ndim == 0:
                meters[key].update(value.item(), n)
        if not need_update:
            continue

        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        task.update_ema(step=num_updates)
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        update_time.update(time.time() - end)
        end = time.time()

        log_now = update_idx % args.log_interval == 0 or batch_idx == num_batches - 1
        if log_now:
            loss_now, loss_avg = _reduce_mean(args, device, meters['loss'].val, meters['loss'].avg)
        if utils.is_primary(args) and log_now:
            # the lr this update used (the scheduler steps after the log, as in timm)
            lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)  # timm's lr column
            extras = '  '.join(f'{k}: {m.avg:.4g}' for k, m in meters.items() if k != 'loss')
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {loss_now:#.3g} ({loss_avg:#.3g})  {extras}  '
                f'Time: {update_time.val:.3f}s, {update_samples / update_time.val:>7.2f}/s  LR: {lr:.3e}')
            if args.save_images and output_dir:
                torchvision.utils.save_image(input, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                             padding=0, normalize=True)
        stop = preemption.requested() if preemption is not None else 0
        if stop or (args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0):
            save_recovery(saver, epoch, batches, args.distributed, accum_steps)
        if stop:
            raise Preempted(stop)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=meters['loss'].avg)
        update_samples = 0
    sync_lookahead(optimizer)
    metrics = OrderedDict(zip(meters, _reduce_mean(args, device, *(m.avg for m in meters.values()))))
    step_cost = OrderedDict(update_s=update_time.avg, sample_ms=1000 * update_time.sum / max(epoch_samples, 1))
    return metrics, step_cost


def _reduce_mean(args, device, *values: float):
    # each process keeps its own running averages; timm logs and returns their mean over processes
    if not args.distributed or args.world_size == 1 or not values:
        return values
    return tuple(utils.reduce_tensor(torch.tensor(values, device=device, dtype=torch.float64), args.world_size).tolist())


def validate_epoch(task, loader_eval, loader_robust, val_attack, args, device, amp_autocast=nullcontext, ema=False):
    """Clean accuracy on the validation split and PGD accuracy (a kNN: worst case over its attacks) on its subset."""
    model = unwrap_ddp(task.get_eval_model(ema=ema))
    metrics = OrderedDict()
    clean = evaluate_accuracy(model, loader_eval, device=device, amp_autocast=amp_autocast,
                              channels_last=args.channels_last)
    metrics.update(loss=clean['loss'], top1=clean['top1'], top5=clean['top5'])
    if loader_robust is not None:
        # a kNN eval model reports the per-sample worst case over its attacks as pgd_top1, and each beside it
        metrics.update(evaluate_robust_accuracy(model, loader_robust, val_attack, device=device,
                                                amp_autocast=amp_autocast, channels_last=args.channels_last))
    return metrics


def _create_saver(args, state: TrainSetup):
    # primary process only: the run's args.yaml, checkpoint saver and (with --log-wandb) wandb run
    output_dir, task = state.output_dir, state.task
    os.makedirs(output_dir, exist_ok=True)
    # secrets (tokens in the args or the environment) never reach a file; local paths stay for -c args.yaml
    args_text = yaml.safe_dump(scrub(args.__dict__, machine=False), default_flow_style=False)
    atomic_write(os.path.join(output_dir, 'args.yaml'), lambda tmp: Path(tmp).write_text(args_text))
    saver = RecoverySaver(
        model=unwrap_ddp(task.get_eval_model()), optimizer=state.optimizer, args=scrub(args, machine=False),
        amp_scaler=state.loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
        decreasing='loss' in args.eval_metric, max_history=args.checkpoint_hist, task=task)
    if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), output_dir):
        if hasattr(saver, 'load_state_dict_from_checkpoint'):
            saver.load_state_dict_from_checkpoint(args.resume)
    wandb_logger = create_wandb_logger(args, os.path.basename(output_dir)) if args.log_wandb else None
    _logger.info(f'Scheduled epochs: {state.num_epochs}. Output: {output_dir}. '
                 f'Method: {args.adv_method} ({type(task).__name__}), attack: {task.attack!r}')
    return saver, wandb_logger


def _evaluate(args, state: TrainSetup, epoch: int) -> dict:
    """Clean and robust validation, plus the overfitting guard's columns.

    With ``--model-ema`` (EMA validated, i.e. not ``--model-ema-force-cpu``) the EMA's metrics replace the
    model's, as in timm: they fill ``summary.csv``, choose ``model_best`` and drive a plateau schedule.
    The guard watches the trained model, whose catastrophic overfitting it acts on.
    """
    task, device, amp_autocast = state.task, state.device, state.amp_autocast
    eval_metrics = validate_epoch(task, state.loaders.eval, state.loaders.robust, state.val_attack, args,
                                  device, amp_autocast=amp_autocast)
    guard_metrics = {}
    if state.overfit_guard is not None:
        guard_metrics = state.overfit_guard.check(epoch, task, state.optimizer, eval_metrics.get('pgd_top1'))
    if task.has_ema() and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
        eval_metrics = validate_epoch(task, state.loaders.eval, state.loaders.robust, state.val_attack,
                                      args, device, amp_autocast=amp_autocast, ema=True)
    eval_metrics.update(guard_metrics)
    return eval_metrics


def train(args, state: TrainSetup) -> dict:
    """Runs the epochs set up by :func:`setup`; returns the last epoch's metrics."""
    task, optimizer, device = state.task, state.optimizer, state.device
    output_dir, num_epochs = state.output_dir, state.num_epochs
    saver, wandb_logger = _create_saver(args, state) if utils.is_primary(args) else (None, None)

    eval_metrics = {}
    protocol = validation_protocol(args, state.loaders.eval, state.loaders.robust, state.val_attack)
    if state.resume_rng is not None:
        set_rng_state(state.resume_rng)  # where the killed run stood after saving this checkpoint
    for epoch in range(state.start_epoch, num_epochs):
        position = state.resume_position if epoch == state.start_epoch else None
        epoch_rng = start_epoch_rng(position, args.rank)  # a recovery point: where its epoch started
        loader_train = state.loaders.train
        set_loader_epoch(loader_train, epoch)
        task.on_epoch_start(epoch)
        train_metrics, step_cost = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler=state.lr_scheduler,
            amp_autocast=state.amp_autocast, loss_scaler=state.loss_scaler, mixup_fn=state.loaders.mixup_fn,
            saver=saver, output_dir=output_dir, batch_size_reference=state.loaders.batch_size_reference,
            preemption=state.preemption, position=position, epoch_rng=epoch_rng)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        if (epoch + 1) % args.val_interval != 0 and epoch + 1 != num_epochs:
            # timm's --val-interval: no validation, summary row or checkpoint this epoch
            state.lr_scheduler.step(epoch + 1, None)
            continue
        eval_metrics = _evaluate(args, state, epoch)
        rng_states = gather_rng_states(args.distributed)
        if utils.is_primary(args):
            _logger.info('Eval: epoch {}  {}'.format(epoch, '  '.join(f'{k}: {v:.4f}' for k, v in eval_metrics.items())))
            lrs = [g['lr'] for g in optimizer.param_groups]
            summary = os.path.join(output_dir, 'summary.csv')
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=summary, lr=sum(lrs) / len(lrs),
                                 write_header=epoch == 0 or not os.path.exists(summary))
            if wandb_logger is not None:
                wandb_logger.log_epoch(epoch, train_metrics, eval_metrics, lr=sum(lrs) / len(lrs), step_cost=step_cost)
            saver.rng_states = rng_states
            saver.validation = dict(epoch=epoch, metrics=dict(eval_metrics), protocol=protocol)  # for the model card
            saver.save_checkpoint(epoch, metric=eval_metrics.get(args.eval_metric))
            saver.rng_states = saver.validation = None  # recovery checkpoints are saved mid-epoch
        stop = state.preemption.requested() if state.preemption is not None else 0
        if stop:  # signalled during validation: last.pth.tar is the recovery point
            raise Preempted(stop)
        if state.overfit_guard is not None and state.overfit_guard.act(task, optimizer):
            break
        state.lr_scheduler.step(epoch + 1, eval_metrics.get(args.eval_metric))
    if saver is not None and saver.best_metric is not None:
        _logger.info(f'*** Best metric: {saver.best_metric} (epoch {saver.best_epoch})')
    if wandb_logger is not None:
        wandb_logger.finish()
    return eval_metrics


def main(argv=None) -> dict:
    utils.setup_default_logging()
    args, _ = parse_args(argv)
    try:
        state = setup(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, before any work or file is written
        print(f'train.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    try:
        with PreemptionHandler(args.distributed, state.device) as state.preemption:
            metrics = train(args, state)  # a signal: recovery checkpoint, then exit 128 + signal (Preempted)
    except CheckpointWriteError as e:  # disk full / read-only: one line; the previous checkpoints are intact
        print(f'train.py: error: {e.strerror}', file=sys.stderr)
        sys.exit(1)
    except UnreadableImageError as e:  # raised in a loader worker, re-raised here with the worker's traceback
        print(f'train.py: error: {unreadable_image_message(e)}', file=sys.stderr)
        sys.exit(1)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""timm-adv training script: timm's train.py flags plus ``--adv-*`` adversarial training.

Built from timm's library pieces (create_model, create_dataset/create_loader, create_optimizer_v2,
create_scheduler_v2, ModelEmaV3 through the task, CheckpointSaver, timm.task). An adversarial
method is a timm task chosen with ``--adv-method``; everything else reads like a timm command:

    python train.py --model resnet10t --adv-method pgd --adv-eps 8/255 --adv-steps 7 --epochs 8

Without ``--data-dir`` / ``--dataset`` it trains on the bundled offline dataset ``bundled/mnist``.
Distributed training: ``torchrun --nproc_per_node N train.py ...`` (gloo on CPU, nccl on CUDA).
"""
import argparse
import logging
import os
import sys
import time
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from datetime import datetime
from functools import partial

import torch
import torch.nn as nn
import yaml

from timm import utils
from timm.data import FastCollateMixup, Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm, set_fast_norm
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint

from timm_adv.attacks import create_attack, unwrap_ddp
from timm_adv.data import (DEFAULT_DATASET, apply_bundled_defaults, apply_dataset_recipe, create_dataset, default_workers,
                           format_recipe, is_bundled, resolve_dataset_name, spread_subset)
from timm_adv.evaluation import add_overfit_guard_args, check_overfit_guard_args, create_overfit_guard, evaluate_accuracy
from timm_adv.models import load_mae_weights, resolve_mae_weights, warn_mae_normalisation
from timm_adv.tasks import add_adv_args, check_adv_args, create_task, get_method
from timm_adv.tasks.arg_types import bounded_type
from timm_adv.utils import (CheckpointError, check_compile_args, check_layer_decay, check_state_dict_matches,
                            checkpoint_state_dict, explicit_args, read_checkpoint)

_logger = logging.getLogger('train')

config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments (a timm args.yaml works)')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='timm-adv ImageNet-style training with adversarial methods')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help=f'dataset type + name ("<type>/<name>") (default: ImageFolder with --data-dir, '
                            f'{DEFAULT_DATASET} without)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split (default: validation)')
    group.add_argument('--dataset-download', action='store_true', default=False, help='allow download of dataset for torch/ datasets')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file (default: "")')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet10t', type=str, metavar='MODEL', help='name of model to train (default: resnet10t)')
    group.add_argument('--pretrained', action='store_true', default=False, help='start with pretrained version of specified network (if avail)')
    group.add_argument('--pretrained-path', default=None, type=str, help='load this checkpoint as if it were the pretrained weights (with adaptation)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='load this checkpoint into model after initialization (default: none)')
    group.add_argument('--resume', default='', type=str, metavar='PATH', help='resume full model and optimizer state from checkpoint (default: none)')
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
    scripting_group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                                 help='Enable compilation w/ specified backend (default: inductor).')

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str, help='device to use for training')
    group.add_argument('--amp', action='store_true', default=False, help='use mixed precision training')
    group.add_argument('--amp-dtype', default='float16', type=str, help='lower precision AMP dtype (default: float16; bfloat16 on CPU)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False, help='force broadcast buffers for native DDP to off')
    group.add_argument('--local_rank', '--local-rank', default=0, type=int)
    group.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend (default: nccl on CUDA, gloo on CPU)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon (default: None, use opt default)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas (default: None, use opt default)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode. One of ("norm", "value", "agc")')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay (default: None)')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine"')
    group.add_argument('--sched-on-updates', action='store_true', default=False, help='apply LR scheduler step on update instead of epoch end')
    group.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR', help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV', help='base learning rate batch size (divisor, default: 256)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT', help='learning rate cycle len multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT', help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly (default: 1.0)')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR', help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N', help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES', help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False, help='exclude warmup period from decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable all training augmentation, override other train aug args')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop-mode in train')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT', help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO', help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='use AutoAugment policy. "v0" or "original". (default: None)')
    group.add_argument('--aug-repeats', type=float, default=0, help='number of augmentation repetitions (distributed training only) (default: 0)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
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
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate (default: None)')

    group = parser.add_argument_group('Batch norm parameters', 'only works with gen_efficientnet based models currently')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action='store_true', help='enable NVIDIA Apex or Torch synchronized BatchNorm.')
    group.add_argument('--dist-bn', type=str, default='reduce', help='distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='enable tracking moving average of model weights.')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='enable warmup for model EMA decay.')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='how many batches to wait before logging training status')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=default_workers(4), metavar='N',
                       help='data loading processes (default: 4, at most the CPUs available to this process)')
    group.add_argument('--pin-mem', action='store_true', default=False, help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH', help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of train experiment, name of sub-folder for output')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='best metric (default: "top1"; "pgd_top1" ranks by robust accuracy)')

    add_adv_args(parser)
    add_overfit_guard_args(parser)
    return parser


def parse_args(argv=None):
    """Parses ``argv`` the way timm's train.py does: a YAML config sets defaults, flags override."""
    parser = _build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    cfg = {}
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser.error(f'-c/--config {args_config.config!r}: no such file.')
        with open(args_config.config, 'r') as f:
            cfg = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        ignored = sorted(k for k in cfg if k not in known and k != 'config')
        if ignored:
            _logger.warning(f'Config keys not supported by timm-adv train.py were ignored: {", ".join(ignored)}')
        cfg = {k: v for k, v in cfg.items() if k in known}
    explicit = explicit_args(parser, remaining, config=cfg, config_name=f'-c {args_config.config}')
    parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    # every key of a -c config counts as given: an args.yaml reproduces its run, recipe or not
    _apply_recipe(args, set(explicit) | set(cfg))
    try:
        check_adv_args(args, explicit)
        check_overfit_guard_args(args, explicit)
        check_compile_args(args.torchcompile, args.torchcompile_mode)
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
        _logger.info(format_recipe(resolve_dataset_name(args), applied))


def _epoch_seed(args, epoch: int) -> None:
    # Every epoch starts from a seed derived from (seed, epoch, rank): a resumed run replays the
    # same shuffles, augmentations and random starts as an uninterrupted one.
    utils.random_seed(args.seed + 10007 * (epoch + 1), args.rank)


def _check_paths(args) -> None:
    if args.resume and not os.path.isfile(args.resume):
        raise CheckpointError(f'--resume {args.resume!r}: no such file; give the last.pth.tar of the run to continue.')
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
    return output_dir


def _write_atomic(path: str, text: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


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


def _create_criterion(args, mixup_active: bool) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def setup(args):
    """Everything before the first epoch: validated inputs, model, task, data, optimizer, resume."""
    _check_paths(args)
    resume_ckpt = read_checkpoint(args.resume, '--resume') if args.resume else None
    # reads --initial-checkpoint / --pretrained-path once (an early check of the files); MAE pre-training
    # weights are loaded by timm_adv.models.mae, anything else by timm as usual
    mae_weights = resolve_mae_weights(args.model, args.pretrained, args.pretrained_path, args.initial_checkpoint)

    device = torch.device(utils.init_distributed_device(args))
    if args.distributed:
        _logger.info(f'Training in distributed mode, process {args.rank}/{args.world_size}, device {device}.')
    utils.random_seed(args.seed, args.rank)
    if args.fast_norm:
        set_fast_norm()

    if not args.data_dir and args.data:
        args.data_dir = args.data
    if not args.dataset and not args.data_dir:
        args.dataset = DEFAULT_DATASET
    apply_bundled_defaults(args)

    method = get_method(args.adv_method)
    mae_flag = mae_weights.flag if mae_weights is not None else ''
    factory_kwargs = {}
    if args.pretrained_path and mae_flag != '--pretrained-path':
        factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
    model = create_model(
        args.model,
        pretrained=args.pretrained and mae_flag not in ('--pretrained', '--pretrained-path'),
        in_chans=args.in_chans or 3,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        checkpoint_path=(args.initial_checkpoint if mae_flag != '--initial-checkpoint' else '') or None,
        **factory_kwargs,
        **args.model_kwargs,
    )
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if mae_weights is not None:
        load_mae_weights(model, mae_weights, model_name=args.model)
    _init_head(model, args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    if utils.is_primary(args):
        warn_mae_normalisation(mae_weights, data_config['mean'], args.model)

    model = method.prepare_model(model, args)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    if args.lr is None:
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            on = args.opt.lower()
            args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    check_layer_decay(optimizer, args.layer_decay, args.model)
    amp_autocast, loss_scaler = _amp_setup(args, device)

    output_dir = _output_dir(args, data_config) if utils.is_primary(args) else None

    # data
    dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                   class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size)
    dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                  class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size)
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    collate_fn, mixup_fn = None, None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if not args.no_prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    loader_common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        persistent_workers=False,  # fresh workers each epoch, seeded from the per-epoch seed
    )
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        interpolation=train_interpolation, collate_fn=collate_fn, **loader_common)
    eval_batch_size = args.validation_batch_size or args.batch_size
    eval_loader_args = dict(input_size=data_config['input_size'], batch_size=eval_batch_size, is_training=False,
                            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                            **loader_common)
    loader_eval = create_loader(dataset_eval, **eval_loader_args)
    loader_robust = None
    if args.adv_val_samples > 0:
        loader_robust = create_loader(spread_subset(dataset_eval, args.adv_val_samples), **eval_loader_args)

    criterion = _create_criterion(args, mixup_active)
    task = create_task(model, criterion, args, mean=data_config['mean'], std=data_config['std'], device=device)
    task.to(device)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)

    start_epoch = 0
    if resume_ckpt is not None:
        # compare with what this task writes: a task may keep part of its model out of ``state_dict``
        check_state_dict_matches(checkpoint_state_dict(resume_ckpt), task.get_checkpoint_state()['state_dict'],
                                 '--resume', arch=resume_ckpt.get('arch', '') if isinstance(resume_ckpt, dict) else '')
        del resume_ckpt
        task.resume_optimizer_state = not args.no_resume_opt  # method optimisers too (FGSM-SDI's generator)
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args)) or 0
        if task.has_ema():
            load_task_ema_checkpoint(task, args.resume)
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    # compiled before DDP wrapping, as timm does: DDP stays out of the graph, validation uses the compiled model
    if args.torchcompile:
        if utils.is_primary(args):
            _logger.info(f'Compiling task components with backend={args.torchcompile}, mode={args.torchcompile_mode}')
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)

    if args.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device.index] if device.type == 'cuda' else None, **ddp_kwargs)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    val_eps = args.adv_val_eps or args.adv_eps or method.attack_defaults.get('eps', 8 / 255)
    val_attack = create_attack(eps=val_eps, steps=args.adv_val_steps, norm=args.adv_norm or 'linf',
                               random_start=True, bn_mode='eval', mean=data_config['mean'], std=data_config['std'])
    overfit_guard = create_overfit_guard(args, loader_robust, val_attack, mean=data_config['mean'],
                                         std=data_config['std'], device=device, amp_autocast=amp_autocast)

    return dict(
        device=device, task=task, optimizer=optimizer, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
        loader_train=loader_train, loader_eval=loader_eval, loader_robust=loader_robust, mixup_fn=mixup_fn,
        lr_scheduler=lr_scheduler, num_epochs=num_epochs, start_epoch=start_epoch, output_dir=output_dir,
        data_config=data_config, val_attack=val_attack, overfit_guard=overfit_guard,
    )


def train_one_epoch(epoch, task, loader, optimizer, args, device, lr_scheduler=None, amp_autocast=nullcontext,
                    loss_scaler=None, mixup_fn=None):
    """One epoch of ``task`` training; returns the averaged loss and every scalar metric the task reported.

    With ``--grad-accum-steps N`` (timm's meaning) the optimizer steps every N batches on the sum of
    the batches' losses divided by N (the last, shorter group of an epoch divides by its own size);
    the task, and so its attack, still runs per batch; under DDP the first N-1 backward passes of a
    group skip the gradient all-reduce (``no_sync``); EMA and the scheduler count optimizer updates.
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
    num_updates = epoch * updates_per_epoch
    update_samples = 0
    end = time.time()
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (input, target) in enumerate(loader):
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
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                            need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                                                 value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        n = input.shape[0]
        update_samples += n * args.world_size
        for key, value in result.items():
            if key != 'output' and torch.is_tensor(value) and value.ndim == 0:
                meters[key].update(value.item(), n)
        if not need_update:
            continue

        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=meters['loss'].avg)
        update_time.update(time.time() - end)
        end = time.time()

        if utils.is_primary(args) and (update_idx % args.log_interval == 0 or batch_idx == num_batches - 1):
            lr = max(g['lr'] for g in optimizer.param_groups)  # the schedule's lr; layer decay scales it down
            extras = '  '.join(f'{k}: {m.avg:.4g}' for k, m in meters.items() if k != 'loss')
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {meters["loss"].val:#.3g} ({meters["loss"].avg:#.3g})  {extras}  '
                f'Time: {update_time.val:.3f}s, {update_samples / update_time.val:>7.2f}/s  LR: {lr:.3e}')
        update_samples = 0
    return OrderedDict((k, m.avg) for k, m in meters.items())


def validate_epoch(task, loader_eval, loader_robust, val_attack, args, device, amp_autocast=nullcontext, ema=False):
    """Clean accuracy on the validation split and PGD accuracy on its fixed subset."""
    model = unwrap_ddp(task.get_eval_model(ema=ema))
    metrics = OrderedDict()
    clean = evaluate_accuracy(model, loader_eval, device=device, amp_autocast=amp_autocast,
                              channels_last=args.channels_last)
    metrics.update(loss=clean['loss'], top1=clean['top1'], top5=clean['top5'])
    if loader_robust is not None:
        robust = evaluate_accuracy(model, loader_robust, attack=val_attack, device=device, amp_autocast=amp_autocast,
                                   channels_last=args.channels_last)
        metrics['pgd_top1'] = robust['top1']
    return metrics


def train(args, state) -> dict:
    """Runs the epochs set up by :func:`setup`; returns the last epoch's metrics."""
    task, optimizer, device = state['task'], state['optimizer'], state['device']
    output_dir = state['output_dir']
    saver = None
    if utils.is_primary(args):
        os.makedirs(output_dir, exist_ok=True)
        _write_atomic(os.path.join(output_dir, 'args.yaml'), yaml.safe_dump(args.__dict__, default_flow_style=False))
        decreasing = 'loss' in args.eval_metric
        saver = utils.CheckpointSaver(
            model=unwrap_ddp(task.get_eval_model()), optimizer=optimizer, args=args, amp_scaler=state['loss_scaler'],
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing,
            max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)), output_dir):
            if hasattr(saver, 'load_state_dict_from_checkpoint'):
                saver.load_state_dict_from_checkpoint(args.resume)
        _logger.info(f'Scheduled epochs: {state["num_epochs"]}. Output: {output_dir}. '
                     f'Method: {args.adv_method} ({type(task).__name__}), attack: {task.attack!r}')

    eval_metrics = {}
    for epoch in range(state['start_epoch'], state['num_epochs']):
        _epoch_seed(args, epoch)
        loader_train = state['loader_train']
        if args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        task.on_epoch_start(epoch)
        start = time.time()
        train_metrics = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, lr_scheduler=state['lr_scheduler'],
            amp_autocast=state['amp_autocast'], loss_scaler=state['loss_scaler'], mixup_fn=state['mixup_fn'])
        train_metrics['epoch_time'] = time.time() - start
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        eval_metrics = validate_epoch(task, state['loader_eval'], state['loader_robust'], state['val_attack'], args,
                                      device, amp_autocast=state['amp_autocast'])
        if task.has_ema() and not args.model_ema_force_cpu:
            ema_metrics = validate_epoch(task, state['loader_eval'], state['loader_robust'], state['val_attack'],
                                         args, device, amp_autocast=state['amp_autocast'], ema=True)
            eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
        if state['overfit_guard'] is not None:
            eval_metrics.update(state['overfit_guard'].check(epoch, task, optimizer, eval_metrics.get('pgd_top1')))
        if utils.is_primary(args):
            _logger.info('Eval: epoch {}  {}'.format(epoch, '  '.join(f'{k}: {v:.4f}' for k, v in eval_metrics.items())))
            lrs = [g['lr'] for g in optimizer.param_groups]
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(output_dir, 'summary.csv'),
                                 lr=sum(lrs) / len(lrs), write_header=epoch == 0 or not os.path.exists(
                                     os.path.join(output_dir, 'summary.csv')))
            saver.save_checkpoint(epoch, metric=eval_metrics.get(args.eval_metric))
        if state['overfit_guard'] is not None and state['overfit_guard'].act(task, optimizer):
            break
        state['lr_scheduler'].step(epoch + 1, eval_metrics.get(args.eval_metric))
    if saver is not None and saver.best_metric is not None:
        _logger.info(f'*** Best metric: {saver.best_metric} (epoch {saver.best_epoch})')
    return eval_metrics


def main(argv=None) -> dict:
    utils.setup_default_logging()
    args, _ = parse_args(argv)
    try:
        state = setup(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, before any work or file is written
        print(f'train.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    metrics = train(args, state)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == '__main__':
    main()

"""timm train.py flags: which combinations timm-adv refuses, and which ``-c args.yaml`` keys it may skip.

timm's train.py accepts every flag in any combination and asserts on a few; several of its flags
only act under another one (``--bce-sum`` under ``--bce-loss``, ``--wandb-tags`` under
``--log-wandb`` ...). Here a flag that would do nothing, and a combination that cannot train
adversarially, fail before any work with a message naming the flags and the fix.
"""
import argparse
import logging
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import timm

from .wandb_log import import_wandb

__all__ = ['RUNTIME_CONFIG_KEYS', 'MODEL_DTYPES', 'check_timm_args', 'split_config_keys']

_logger = logging.getLogger(__name__)

#: Keys a train.py writes into ``args`` at run time (timm's and ours), so they appear in an
#: ``args.yaml`` without being flags; they describe the machine a run used, not its recipe.
RUNTIME_CONFIG_KEYS = frozenset({'config', 'distributed', 'world_size', 'rank', 'local_rank', 'prefetcher', 'device'})

MODEL_DTYPES = ('float32', 'float16', 'bfloat16')
_FUSERS = ('', 'te', 'old', 'nvfuser')


def _is_off(value) -> bool:
    return value is None or value is False or (not isinstance(value, bool) and value in (0, '', [], {}))


def split_config_keys(cfg: Mapping, known: Iterable[str]) -> Tuple[Dict, List[str], List[str]]:
    """Sorts the keys of a ``-c`` YAML config (e.g. a timm ``args.yaml``).

    Returns:
        ``(usable, skipped, refused)``: ``usable`` maps the parser's own destinations to their values;
        ``skipped`` are keys this parser lacks whose value cannot change a recipe (run-time keys such as
        ``rank``, or an unknown flag left off: ``None``, ``False``, ``0``, empty); ``refused`` are
        unknown keys set to something, which would change the recipe if honoured.

    Example:
        >>> split_config_keys({'lr': 0.1, 'rank': 0, 'torchcompile': 'inductor'}, {'lr'})
        ({'lr': 0.1}, ['rank'], ['torchcompile'])
    """
    known = set(known)
    usable = {k: v for k, v in cfg.items() if k in known}
    unknown = sorted(k for k in cfg if k not in known)
    skipped = [k for k in unknown if k in RUNTIME_CONFIG_KEYS or _is_off(cfg[k])]
    refused = [k for k in unknown if k not in skipped]
    return usable, skipped, refused


def _needs(explicit: Mapping[str, str], dests: Iterable[str], enabled: bool, requirement: str) -> None:
    if enabled:
        return
    given = [explicit[d] for d in dests if d in explicit]
    if given:
        raise ValueError(f'{", ".join(given)} does nothing without {requirement}; drop it, or add {requirement}.')


def _check_dependent_flags(args: argparse.Namespace, explicit: Mapping[str, str]) -> None:
    _needs(explicit, ('bce_sum', 'bce_target_thresh', 'bce_pos_weight'), args.bce_loss, '--bce-loss')
    _needs(explicit, ('layer_decay_min_scale', 'layer_decay_no_opt_scale'), args.layer_decay is not None,
           '--layer-decay')
    _needs(explicit, ('lr_noise_pct', 'lr_noise_std'), args.lr_noise is not None, '--lr-noise')
    _needs(explicit, ('wandb_project', 'wandb_tags', 'wandb_resume_id'), args.log_wandb, '--log-wandb')
    _needs(explicit, ('fuser',), args.torchscript, '--torchscript (the fuser only drives TorchScript)')
    _needs(explicit, ('train_batch_sizes', 'train_size_probs', 'train_size_schedule', 'train_size_schedule_spread',
                      'train_size_random_mix', 'train_batches_per_epoch', 'variable_batch_loss_scale'),
           args.train_img_sizes is not None, '--train-img-sizes')
    _needs(explicit, ('naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
                      'naflex_loss_scale', 'naflex_patchify_channels_first'), args.naflex_loader, '--naflex-loader')
    _needs(explicit, ('resplit',), args.aug_splits > 1 and args.reprob > 0,
           '--aug-splits N and --reprob P (it keeps random erasing off the clean split)')
    if args.wandb_resume_id and not args.resume:
        raise ValueError('--wandb-resume-id continues a wandb run and needs --resume (the checkpoint of that run).')


def _check_augmix(args: argparse.Namespace) -> None:
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise ValueError(f'--aug-splits {args.aug_splits}: use 0 (off) or N >= 2 (clean + N-1 AugMix views).')
    if args.jsd_loss and args.aug_splits < 2:
        raise ValueError('--jsd-loss is a consistency loss between AugMix splits; add --aug-splits 3 (as timm\'s '
                         'AugMix recipe), or drop --jsd-loss.')
    if args.jsd_loss and args.bce_loss:
        raise ValueError('--bce-loss does nothing with --jsd-loss (timm then trains with the JSD loss only); '
                         'drop one of them.')
    if args.jsd_loss and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        raise ValueError('--jsd-loss takes class labels, --mixup/--cutmix make soft targets; drop one of them.')
    if args.aug_splits > 1 and args.no_prefetcher:
        raise ValueError('--aug-splits with --no-prefetcher: timm stacks the AugMix splits in the prefetcher\'s '
                         'collate; drop --no-prefetcher.')
    if args.aug_splits > 1 and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        raise ValueError('--mixup/--cutmix with --aug-splits: timm\'s collate mixup cannot de-interleave the AugMix '
                         'splits; drop one of them.')
    if args.split_bn and args.aug_splits < 2:
        raise ValueError('--split-bn keeps BN statistics per AugMix split; add --aug-splits N.')
    if args.split_bn and args.sync_bn:
        raise ValueError('--split-bn cannot be combined with --sync-bn (timm converts only one of them).')
    if args.adv_method != 'none' and (args.aug_splits > 1 or args.split_bn):
        given = ' '.join(f for f, on in (('--aug-splits', args.aug_splits > 1), ('--jsd-loss', args.jsd_loss),
                                         ('--split-bn', args.split_bn)) if on)
        raise ValueError(
            f'{given} with --adv-method {args.adv_method}: AugMix feeds each batch as stacked splits (clean, '
            f'augmented...) whose order the JSD loss and split BN rely on, while the methods attack, re-split or '
            f'route BN (advprop/advbn/dat auxiliary BN) over the whole batch; no published recipe combines them. '
            f'Train AugMix with --adv-method none, or drop {given}.')
    if args.aug_splits > 1 and args.train_img_sizes is not None:
        raise ValueError('--aug-splits cannot be combined with --train-img-sizes (timm\'s scheduled loader has no '
                         'AugMix splits).')


def _check_runtime(args: argparse.Namespace, explicit: Mapping[str, str], bundled: bool, iterable: bool) -> None:
    if args.model_dtype is not None:
        if args.model_dtype not in MODEL_DTYPES:
            raise ValueError(f'--model-dtype {args.model_dtype!r}: choose one of {", ".join(MODEL_DTYPES)}.')
        if args.amp and args.model_dtype != 'float32':
            raise ValueError(f'--model-dtype {args.model_dtype} with --amp: AMP needs float32 weights; drop one.')
        if args.no_prefetcher and args.model_dtype != 'float32':
            raise ValueError(f'--model-dtype {args.model_dtype} with --no-prefetcher: the prefetcher casts the '
                             f'batches to the model dtype (and the robust validation reads them as they come); '
                             f'drop --no-prefetcher.')
    if args.fuser not in _FUSERS:
        raise ValueError(f'--fuser {args.fuser!r}: choose one of {", ".join(repr(f) for f in _FUSERS)}.')
    if args.fuser == 'nvfuser':
        raise ValueError('--fuser nvfuser: torch no longer has nvfuser in TorchScript (selecting it does nothing); '
                         'use --fuser te or old.')
    if args.torchscript and args.sync_bn:
        raise ValueError('--torchscript cannot script SyncBatchNorm (--sync-bn); drop one of them.')
    if args.tta > 1:
        raise ValueError(f'--tta {args.tta}: timm\'s train.py averages every {args.tta} consecutive validation '
                         f'outputs, which needs a loader that yields {args.tta} views per image; no train loader '
                         f'does, so it would average different images. Drop --tta (0).')
    if args.naflex_loader:
        raise ValueError('--naflex-loader: NaFlex batches are patch dictionaries, while the attacks, the robust '
                         'validation and the methods perturb image tensors. Drop --naflex-loader; for '
                         'variable-resolution training use --train-img-sizes.')
    if args.val_interval < 1:
        raise ValueError(f'--val-interval must be >= 1, got {args.val_interval}.')
    for dest in ('train_num_samples', 'val_num_samples'):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f'{explicit.get(dest, dest)} must be >= 1, got {value}.')
    if args.recovery_interval < 0:
        raise ValueError(f'--recovery-interval must be >= 0 (0: off), got {args.recovery_interval}.')
    if args.epoch_repeats and not iterable:
        name = args.dataset or ('the bundled dataset' if bundled else 'the --data-dir folder')
        raise ValueError(f'--epoch-repeats {args.epoch_repeats:g} only repeats streaming datasets (tfds/, wds/, '
                         f'hfids/); {name} is map-style. Drop it, or raise --epochs.')
    if args.use_multi_epochs_loader and args.train_img_sizes is not None:
        raise ValueError('--use-multi-epochs-loader cannot be combined with --train-img-sizes (timm\'s scheduled '
                         'loader); drop one of them.')
    if bundled:
        given = [explicit[d] for d in ('input_img_mode', 'input_key', 'target_key', 'dataset_trust_remote_code')
                 if d in explicit]
        if given:
            raise ValueError(f'{", ".join(given)}: the bundled dataset {args.dataset or "bundled/mnist"!r} has no '
                             f'reader to configure; drop it, or name your dataset with --dataset/--data-dir.')


def check_timm_args(
        args: argparse.Namespace,
        explicit: Optional[Mapping[str, str]] = None,
        bundled: bool = False,
        iterable: bool = False,
) -> None:
    """Fails early on timm train.py flags that would do nothing, or cannot train adversarially.

    Also applies timm's deprecated ``--drop-connect`` as ``--drop-path`` (what it always meant).

    Args:
        args: Parsed ``train.py`` arguments.
        explicit: The flags the user set, ``{dest: flag}`` (:func:`timm_adv.utils.explicit_args`).
        bundled: The run trains on a bundled dataset (no reader flags apply).
        iterable: The dataset is a streaming one (``tfds/``, ``wds/``, ``hfids/``).

    Raises:
        ValueError: Naming the flags and the fix.

    Example:
        >>> check_timm_args(parser.parse_args(['--adv-method', 'pgd', '--aug-splits', '3']))
        ValueError: --aug-splits with --adv-method pgd: AugMix feeds each batch as stacked splits ...
    """
    explicit = explicit or {}
    if ':' not in args.model and not timm.is_model(args.model):  # hf-hub: / local-dir: names resolve at creation
        raise ValueError(f'--model {args.model!r} is not a timm architecture; timm.list_models() lists them.')
    _check_dependent_flags(args, explicit)
    _check_augmix(args)
    _check_runtime(args, explicit, bundled, iterable)
    if args.drop_connect is not None:
        if args.drop_path is not None:
            raise ValueError('--drop-connect is the deprecated name of --drop-path; give only --drop-path.')
        _logger.warning(f'--drop-connect is deprecated in timm; applied as --drop-path {args.drop_connect}.')
        args.drop_path = args.drop_connect
    if args.log_wandb:
        import_wandb()  # fails now, not after the first epoch
    if args.use_multi_epochs_loader and args.workers > 0:
        _logger.warning('--use-multi-epochs-loader keeps the data-loader workers across epochs, so their random '
                        'state is not in the checkpoints: a --resume no longer replays the killed run exactly.')
    if args.synchronize_step and not str(args.device).startswith('cuda'):
        _logger.warning(f'--synchronize-step synchronises CUDA after each update; on {args.device} it does nothing.')

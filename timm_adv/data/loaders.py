"""The train / validation / robust-validation loaders of ``train.py``, built from timm's data pieces."""
import argparse
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from timm.data import AugMixDataset, FastCollateMixup, Mixup, create_loader

from .bundled import is_bundled
from .dataset_factory import create_dataset
from .subset import spread_subset
from .unreadable import check_unreadable_images

_logger = logging.getLogger(__name__)

__all__ = ['TrainLoaders', 'create_train_loaders', 'is_iterable_dataset', 'set_loader_epoch']

_ITERABLE_PREFIXES = ('tfds/', 'wds/', 'hfids/')


def is_iterable_dataset(name: Optional[str]) -> bool:
    """True for timm's streaming datasets (``tfds/``, ``wds/``, ``hfids/``), which take ``num_samples``/``repeats``."""
    return bool(name) and name.lower().startswith(_ITERABLE_PREFIXES)


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tells a loader's dataset and (batch) sampler which epoch starts, as timm's train.py does.

    Streaming datasets (tfds, wds, hfids) reshuffle from it, the scheduled batch sampler of
    ``--train-img-sizes`` reorders and advances ``--train-size-schedule progressive`` with it, and the
    DDP sampler reshuffles; a batch sampler that takes the epoch passes it on itself.

    Example:
        >>> for epoch in range(num_epochs):
        ...     set_loader_epoch(loader_train, epoch)
    """
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(epoch)
    elif hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


@dataclass
class TrainLoaders:
    """What ``train.py`` needs from the data phase.

    Attributes:
        train: Training loader (timm's ``create_loader``, optionally with scheduled input sizes).
        eval: Clean validation loader.
        robust: Fixed validation subset attacked each epoch (None with ``--adv-val-samples 0``).
        mixup_fn: Per-batch mixup / cutmix without the prefetcher (None otherwise).
        mixup_active: Whether mixup or cutmix is on (the criterion then takes soft targets).
        num_aug_splits: AugMix splits of each training batch (0: none).
        batch_size_reference: Mean training batch size (the scheduled policy's average with ``--train-img-sizes``).
    """
    train: Any
    eval: Any
    robust: Any
    mixup_fn: Optional[Mixup]
    mixup_active: bool
    num_aug_splits: int
    batch_size_reference: float


def _datasets(args: argparse.Namespace, input_img_mode: str):
    reader_kwargs = {}
    if not is_bundled(args.dataset):
        if args.dataset_trust_remote_code:
            _logger.warning(f'--dataset-trust-remote-code: {args.dataset!r} may run Python code from its repository '
                            f'while loading; use it only for a dataset whose code you trust.')
        reader_kwargs = dict(input_img_mode=input_img_mode, input_key=args.input_key, target_key=args.target_key,
                             trust_remote_code=args.dataset_trust_remote_code)
    iterable = is_iterable_dataset(args.dataset)
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, **reader_kwargs)
    train = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed,
                           repeats=args.epoch_repeats, num_samples=args.train_num_samples if iterable else None,
                           **common)
    eval_ = create_dataset(args.dataset, split=args.val_split, is_training=False,
                           num_samples=args.val_num_samples if iterable else None, **common)
    skip = getattr(args, 'skip_bad_images', False)
    if not any([check_unreadable_images(train, skip), check_unreadable_images(eval_, skip)]) and skip:
        raise ValueError(f'--skip-bad-images does nothing with --dataset {args.dataset!r}: it applies to image folders '
                         f'and tars, whose files are decoded one by one.')
    # timm reads --train/val-num-samples for streaming datasets only; on a map-style dataset they
    # would be ignored, so there they take an evenly spread subset of that size
    if not iterable and args.train_num_samples:
        train = spread_subset(train, args.train_num_samples)
    if not iterable and args.val_num_samples:
        eval_ = spread_subset(eval_, args.val_num_samples)
    return train, eval_


def _mixup(args: argparse.Namespace):
    # (mixup_active, collate mixup for the prefetcher, per-batch mixup without it)
    if not (args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None):
        return False, None, None
    mixup_args = dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, num_classes=args.num_classes)
    if args.no_prefetcher:
        return True, None, Mixup(**mixup_args)
    return True, FastCollateMixup(**mixup_args), None


def create_train_loaders(
        args: argparse.Namespace,
        data_config: Mapping[str, Any],
        device: torch.device,
        model_dtype: Optional[torch.dtype] = None,
) -> TrainLoaders:
    """Datasets and loaders of a training run, configured by timm's train.py flags.

    Every augmentation flag goes to timm's ``create_loader`` as in timm's train.py: random erasing
    (``--reprob --remode --recount --resplit``), colour / grayscale / blur, AutoAugment, repeated
    augmentation, AugMix splits (``--aug-splits``, through ``AugMixDataset``), scheduled input sizes
    (``--train-img-sizes`` ...), mixup / cutmix. Workers are created afresh each epoch, seeded from the
    main process's random state, which checkpoints keep (unless ``--use-multi-epochs-loader``).

    Args:
        args: Parsed ``train.py`` arguments (``args.num_classes`` resolved).
        data_config: timm's ``resolve_data_config`` result.
        device: Device the prefetcher moves batches to.
        model_dtype: ``--model-dtype`` (the prefetcher casts images to it).

    Example:
        >>> loaders = create_train_loaders(args, resolve_data_config(vars(args), model=model), torch.device('cpu'))
        >>> for input, target in loaders.train: ...
    """
    num_aug_splits = args.aug_splits if args.aug_splits > 1 else 0
    input_img_mode = args.input_img_mode or ('RGB' if data_config['input_size'][0] == 3 else 'L')
    dataset_train, dataset_eval = _datasets(args, input_img_mode)
    mixup_active, collate_fn, mixup_fn = _mixup(args)
    if num_aug_splits:
        dataset_train = AugMixDataset(dataset_train, num_splits=num_aug_splits)

    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        img_dtype=model_dtype or torch.float32, worker_seeding=args.worker_seeding,
        persistent_workers=False,  # fresh workers each epoch, seeded from the checkpointed random state
    )
    scheduled = args.train_img_sizes is not None
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob, gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, num_aug_splits=num_aug_splits, interpolation=train_interpolation,
        collate_fn=collate_fn, use_multi_epochs_loader=args.use_multi_epochs_loader,
        input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
        batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
        batch_choice_schedule=args.train_size_schedule,
        batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
        batch_schedule_spread=args.train_size_schedule_spread, batch_schedule_random_mix=args.train_size_random_mix,
        num_batches=args.train_batches_per_epoch, **common)
    batch_size_reference = loader_train.batch_sampler.average_batch_size if scheduled else float(args.batch_size)

    eval_args = dict(input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
                     is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                     **common)
    loader_eval = create_loader(dataset_eval, **eval_args)
    loader_robust = None
    if args.adv_val_samples > 0:
        loader_robust = create_loader(spread_subset(dataset_eval, args.adv_val_samples), **eval_args)
    return TrainLoaders(loader_train, loader_eval, loader_robust, mixup_fn, mixup_active, num_aug_splits,
                        batch_size_reference)

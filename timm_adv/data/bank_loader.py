"""The loader that embeds a labelled split into a kNN feature bank (eval transform, fixed order)."""
from typing import Mapping, Optional

import torch
from timm.data import create_loader

from .dataset_factory import create_dataset
from .subset import spread_subset

__all__ = ['create_bank_loader']


def create_bank_loader(dataset: str, root: Optional[str], split: str, data_config: Mapping, batch_size: int = 256,
                       workers: int = 0, device: Optional[torch.device] = None, num_samples: Optional[int] = None,
                       use_prefetcher: bool = False, **dataset_kwargs):
    """A non-shuffled eval-transform loader over ``split`` (or ``num_samples`` evenly spaced items of it).

    Example:
        >>> loader = create_bank_loader('bundled/mnist', None, 'train', data_config, num_samples=2000)
    """
    ds = create_dataset(dataset, root=root, split=split, is_training=False, **dataset_kwargs)
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f'--knn-bank-samples / --adv-knn-bank-samples must be >= 1, got {num_samples}.')
        ds = spread_subset(ds, num_samples)
    return create_loader(
        ds, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=workers,
        device=device if device is not None else torch.device('cpu'), use_prefetcher=use_prefetcher,
        persistent_workers=False)

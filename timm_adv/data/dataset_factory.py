"""Dataset creation: the bundled offline datasets, then everything timm's factory knows."""
import os
from typing import Optional

from timm.data import create_dataset as timm_create_dataset

from .bundled import BUNDLED_DATASETS, is_bundled

__all__ = ['create_dataset', 'DEFAULT_DATASET']

#: Used when neither ``--dataset`` nor ``--data-dir`` is given.
DEFAULT_DATASET = 'bundled/mnist'


def create_dataset(name: Optional[str], root: Optional[str] = None, split: str = 'validation',
                   is_training: bool = False, **kwargs):
    """Creates a dataset by name: ``bundled/*`` offline datasets, or any timm dataset.

    Args:
        name: ``bundled/mnist``, or a timm dataset name (``''`` for an image folder, ``torch/cifar10``...).
        root: Data directory for timm datasets (unused by bundled ones).
        split: Split name.
        is_training: Passed to timm (controls shuffling of iterable datasets).
        **kwargs: Passed to ``timm.data.create_dataset``.

    Example:
        >>> ds = create_dataset('bundled/mnist', split='train')
        >>> ds = create_dataset('', root='/data/imagenet', split='validation')
    """
    if is_bundled(name):
        return BUNDLED_DATASETS[name.lower()](split)
    if root is not None and not name.startswith(('hfds/', 'hfids/', 'wds/', 'tfds/')) and not os.path.exists(root):
        if not kwargs.get('download', False):
            raise FileNotFoundError(f'--data-dir {root!r} does not exist; point it at your dataset, or omit '
                                    f'--data-dir/--dataset to use the bundled dataset {DEFAULT_DATASET}.')
    return timm_create_dataset(name, root=root, split=split, is_training=is_training, **kwargs)

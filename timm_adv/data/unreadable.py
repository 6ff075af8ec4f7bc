"""Unreadable images (truncated, not an image) in a folder or tar dataset: fail at the file, naming it, or skip it.

timm's ``ImageDataset`` loads the next sample in place of one it cannot decode, with a warning that
does not say which file. A training run should not quietly drop data: :func:`check_unreadable_images`
makes a dataset raise :class:`UnreadableImageError` with the file's path, or, with
``--skip-bad-images``, skip it with a warning that counts the files skipped so far.

Example:
    >>> check_unreadable_images(dataset, skip=False)
    >>> dataset[17]
    UnreadableImageError: /data/train/cat/017.jpg: cannot read this image (...). Remove or replace it, ...
"""
import logging

from PIL import Image
from timm.data import ImageDataset

__all__ = ['UnreadableImageError', 'check_unreadable_images', 'unreadable_image_message']

_logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """A dataset file that cannot be decoded as an image."""


class _CheckedImageDataset(ImageDataset):
    skip_unreadable = False
    skipped = 0  # in this process (each loader worker counts its own)

    def __getitem__(self, index):
        for _ in range(len(self)):
            path = self.filename(index, absolute=True)
            try:
                img, target, *features = self.reader[index]
                img = img.read() if self.load_bytes else Image.open(img)
                if not self.load_bytes and self.input_img_mode:
                    img = img.convert(self.input_img_mode)  # decodes the pixels: a truncated file fails here
                break
            except OSError as e:  # PIL's UnidentifiedImageError and truncation errors are OSErrors
                reason = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
                if not self.skip_unreadable:
                    raise UnreadableImageError(f'{path}: cannot read this image ({reason}). Remove or replace it, '
                                               f'or pass --skip-bad-images to train without it.') from None
                type(self).skipped += 1
                _logger.warning(f'--skip-bad-images: skipped {path} ({reason}); {type(self).skipped} skipped so far '
                                f'in this process.')
                index = (index + 1) % len(self)
        else:
            raise UnreadableImageError(f'{path}: no readable image in the dataset.')
        if self.transform is not None:
            img = self.transform(img)
        target = -1 if target is None else (self.target_transform(target) if self.target_transform else target)
        return (img, target, *features) if self.additional_features is not None else (img, target)


def check_unreadable_images(dataset, skip: bool = False) -> bool:
    """Makes a timm ``ImageDataset`` name (or, with ``skip``, skip and count) the files it cannot decode.

    Returns:
        Whether ``dataset`` reads image files (other datasets are left as they are).
    """
    if type(dataset) is not ImageDataset:
        return False
    dataset.__class__ = _CheckedImageDataset  # the instance timm's factory built, with its reader and transforms
    dataset.skip_unreadable = skip
    return True


def unreadable_image_message(error: UnreadableImageError) -> str:
    """The one-line message of ``error``, also when a loader worker re-raised it with the worker's traceback."""
    last = str(error).strip().splitlines()[-1]
    return last.split('UnreadableImageError: ', 1)[-1]

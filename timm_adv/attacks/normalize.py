"""Exact conversion between pixel space [0, 1] and a model's normalised input space.

timm loaders (and the CUDA prefetcher) hand the model ``(x - mean) / std``. Attacks are defined in
pixel space, so they map the batch back, perturb and clamp there, and map forward again.
"""
from typing import Optional, Sequence, Union

import torch

__all__ = ['PixelNormalizer']

_Stats = Optional[Union[float, Sequence[float], torch.Tensor]]


class PixelNormalizer:
    """Maps between pixel space and normalised model-input space, per channel.

    With ``mean`` and ``std`` left as ``None`` it is the identity (the model takes pixels).

    Args:
        mean: Per-channel mean used by the loader, e.g. ``IMAGENET_DEFAULT_MEAN``.
        std: Per-channel std used by the loader.

    Example:
        >>> norm = PixelNormalizer((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.allclose(norm.to_pixel(norm.from_pixel(x)), x)
        True
    """

    def __init__(self, mean: _Stats = None, std: _Stats = None):
        if (mean is None) != (std is None):
            raise ValueError('PixelNormalizer needs both mean and std, or neither.')
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f'std must be positive, got {self.std.flatten().tolist()}')

    @property
    def is_identity(self) -> bool:
        return self.mean is None

    def _stats(self, x: torch.Tensor):
        return self.mean.to(device=x.device, dtype=x.dtype), self.std.to(device=x.device, dtype=x.dtype)

    def to_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised model input -> pixel space."""
        if self.is_identity:
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def from_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space -> normalised model input."""
        if self.is_identity:
            return x
        mean, std = self._stats(x)
        return (x - mean) / std

    def __repr__(self) -> str:
        if self.is_identity:
            return 'PixelNormalizer(identity)'
        return f'PixelNormalizer(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})'

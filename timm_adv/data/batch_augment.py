"""Batch-level random augmentation on the device, to make the two views of contrastive learning.

The training loop hands a task one batch; a contrastive task draws two independent views of it here,
with torch ops on the whole batch (no data-loader change, GPU friendly). Each sample gets its own
random resized crop (an affine resampling grid), horizontal flip, brightness / contrast jitter and
Gaussian noise, in pixel space [0, 1], clamped back to [0, 1].
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ['ViewAugment']


class ViewAugment:
    """Random view of a pixel-space batch ``[B, C, H, W]`` in [0, 1].

    Args:
        scale: Range of the crop's area fraction (``RandomResizedCrop`` scale).
        ratio: Range of the crop's aspect ratio.
        hflip: Probability of a horizontal flip (0 for digits and text).
        jitter: Brightness and contrast factors drawn from ``[1 - jitter, 1 + jitter]``.
        noise_std: Standard deviation of added Gaussian noise.

    Example:
        >>> augment = ViewAugment(scale=(0.2, 1.0), hflip=0.5, jitter=0.4)
        >>> v1, v2 = augment(x_pix), augment(x_pix)
    """

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, jitter: float = 0.4, noise_std: float = 0.0):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f'--adv-contrastive-scale needs 0 < MIN <= MAX <= 1, got {list(scale)}.')
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'crop ratio needs 0 < MIN <= MAX, got {list(ratio)}.')
        if not 0 <= hflip <= 1:
            raise ValueError(f'--adv-contrastive-hflip must be in [0, 1], got {hflip}.')
        if not 0 <= jitter < 1:
            raise ValueError(f'--adv-contrastive-jitter must be in [0, 1), got {jitter}.')
        if not noise_std >= 0:
            raise ValueError(f'--adv-contrastive-noise must be >= 0, got {noise_std}.')
        self.scale = tuple(float(s) for s in scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = float(hflip)
        self.jitter = float(jitter)
        self.noise_std = float(noise_std)

    def _uniform(self, n: int, low: float, high: float, ref: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=ref.device, dtype=ref.dtype).uniform_(low, high)

    def crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        area = self._uniform(n, *self.scale, ref=x)
        ratio = torch.exp(self._uniform(n, *self.log_ratio, ref=x))
        # half-widths in the [-1, 1] grid coordinates of affine_grid
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand_like(w) * 2 - 1) * (1 - w)
        cy = (torch.rand_like(h) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand_like(w) < self.hflip, -1.0, 1.0).to(x.dtype)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.crop_and_flip(x)
        n, shape = x.shape[0], (-1, 1, 1, 1)
        if self.jitter > 0:
            brightness = self._uniform(n, 1 - self.jitter, 1 + self.jitter, ref=x).view(shape)
            contrast = self._uniform(n, 1 - self.jitter, 1 + self.jitter, ref=x).view(shape)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x * brightness - mean * brightness) * contrast + mean * brightness)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        ratio = tuple(round(math.exp(r), 4) for r in self.log_ratio)
        return (f'ViewAugment(scale={self.scale}, ratio={ratio}, hflip={self.hflip}, jitter={self.jitter}, '
                f'noise_std={self.noise_std})')

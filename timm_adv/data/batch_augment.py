"""Batch-level random augmentation on the device, to make the two views of contrastive learning.

The training loop hands a task one batch; a contrastive task draws two independent views of it here,
with torch ops on the whole batch (no data-loader change, GPU friendly). Each sample gets its own
random resized crop (an affine resampling grid), horizontal flip, brightness / contrast / saturation /
hue jitter, random grayscale, Gaussian blur and Gaussian noise, in pixel space [0, 1], clamped back to
[0, 1]. The colour operations are SimCLR's (Chen et al., 2020) on an RGB batch and skipped on one channel.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from timm_adv.utils.errors import ParameterError

__all__ = ['ViewAugment']

#: ITU-R BT.601 luma weights (torchvision's grayscale).
_LUMA = torch.tensor([0.299, 0.587, 0.114])
#: RGB -> YIQ (luma + two chroma axes): a hue change is a rotation of the chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class ViewAugment:
    """Random view of a pixel-space batch ``[B, C, H, W]`` in [0, 1].

    Args:
        scale: Range of the crop's area fraction (``RandomResizedCrop`` scale).
        ratio: Range of the crop's aspect ratio.
        hflip: Probability of a horizontal flip (0 for digits and text).
        jitter: Brightness and contrast factors drawn from ``[1 - jitter, 1 + jitter]``.
        noise_std: Standard deviation of added Gaussian noise.
        saturation: Saturation factor drawn from ``[1 - saturation, 1 + saturation]`` (RGB only).
        hue: Hue rotation drawn from ``[-hue, hue]`` turns (RGB only; rotation in the YIQ chroma plane).
        grayscale: Probability of replacing a view by its luminance (RGB only).
        blur: Probability of a Gaussian blur, sigma drawn from ``[0.1, 2.0]`` x image size / 224.

    Example:
        >>> augment = ViewAugment(scale=(0.2, 1.0), hflip=0.5, jitter=0.4, saturation=0.4, hue=0.1, grayscale=0.2)
        >>> v1, v2 = augment(x_pix), augment(x_pix)
    """

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, jitter: float = 0.4, noise_std: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0, grayscale: float = 0.0, blur: float = 0.0):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ParameterError('scale', f'needs 0 < MIN <= MAX <= 1, got {list(scale)}.')
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ParameterError('ratio', f'needs 0 < MIN <= MAX, got {list(ratio)}.')
        if not 0 <= hflip <= 1:
            raise ParameterError('hflip', f'must be in [0, 1], got {hflip}.')
        if not 0 <= jitter < 1:
            raise ParameterError('jitter', f'must be in [0, 1), got {jitter}.')
        if not noise_std >= 0:
            raise ParameterError('noise_std', f'must be >= 0, got {noise_std}.')
        for name, value, high in (('saturation', saturation, 1.0), ('hue', hue, 0.5), ('grayscale', grayscale, 1.0),
                                  ('blur', blur, 1.0)):
            if not 0 <= value <= high:
                raise ParameterError(name, f'must be in [0, {high:g}], got {value}.')
        self.saturation, self.hue, self.grayscale, self.blur = float(saturation), float(hue), float(grayscale), float(blur)
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
        if x.shape[1] == 3:
            x = self.colour(x.clamp(0.0, 1.0))
        if self.blur > 0:
            x = self.gaussian_blur(x)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x.clamp(0.0, 1.0)

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        """Saturation, hue and random grayscale of an RGB batch."""
        n, shape = x.shape[0], (-1, 1, 1, 1)
        luma = (x * _LUMA.to(x).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.saturation > 0:
            factor = self._uniform(n, 1 - self.saturation, 1 + self.saturation, ref=x).view(shape)
            x = (luma + (x - luma) * factor).clamp(0.0, 1.0)
        if self.hue > 0:
            angle = self._uniform(n, -self.hue, self.hue, ref=x) * 2 * math.pi
            yiq = torch.einsum('ij,bjhw->bihw', _RGB_TO_YIQ.to(x), x)
            cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
            i, q = yiq[:, 1], yiq[:, 2]
            yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
            x = torch.einsum('ij,bjhw->bihw', torch.linalg.inv(_RGB_TO_YIQ).to(x), yiq).clamp(0.0, 1.0)
        if self.grayscale > 0:
            gray = torch.rand(n, device=x.device) < self.grayscale
            luma = (x * _LUMA.to(x).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = torch.where(gray.view(shape), luma.expand_as(x), x)
        return x

    def gaussian_blur(self, x: torch.Tensor) -> torch.Tensor:
        """A separable Gaussian blur on a random subset of the views, one sigma per view."""
        n, c, h, w = x.shape
        scale = min(h, w) / 224  # SimCLR's sigma range is for 224 px images
        sigma = self._uniform(n, 0.1 * scale, 2.0 * scale, ref=x).clamp_min(1e-3)
        radius = max(1, math.ceil(3 * 2.0 * scale))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # [n * c, 2r + 1]
        flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode='reflect')
        flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
        flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
        blurred = flat.view(n, c, h, w)
        chosen = torch.rand(n, device=x.device) < self.blur
        return torch.where(chosen.view(-1, 1, 1, 1), blurred, x)

    def __repr__(self) -> str:
        ratio = tuple(round(math.exp(r), 4) for r in self.log_ratio)
        return (f'ViewAugment(scale={self.scale}, ratio={ratio}, hflip={self.hflip}, jitter={self.jitter}, '
                f'saturation={self.saturation}, hue={self.hue}, grayscale={self.grayscale}, blur={self.blur}, '
                f'noise_std={self.noise_std})')

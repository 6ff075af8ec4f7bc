"""A picture of what DAT trains on: clean images, their VQGAN reconstructions and the DAT examples.

Example:
    >>> save_dat_preview(augment, model, images, targets, 'dat_preview.png')
"""
import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from .discrete_adversarial import DiscreteAdversarialAugment

__all__ = ['PREVIEW_ROWS', 'dat_preview_grid', 'save_dat_preview']

#: The grid's rows, top to bottom.
PREVIEW_ROWS = ('clean', 'VQGAN reconstruction', 'DAT adversarial example')


@torch.no_grad()
def dat_preview_grid(augment: DiscreteAdversarialAugment, model: nn.Module, x: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """``[3 * N, C, H, W]`` pixels in [0, 1]: the clean images, their reconstructions, their DAT examples.

    Args:
        augment: DAT's augmentation (its VQGAN and attack).
        model: The classifier the examples attack (eval mode gives the examples of the final model).
        x: Normalised images, as the loader gives them.
        target: Their class indices.
    """
    x_pix = augment.normalizer.to_pixel(x).float().clamp(0, 1)
    x_rec = augment.vqgan.decode(augment.vqgan.encode(x_pix)).float()
    with torch.enable_grad():  # the attack differentiates through the model
        x_dat = augment.normalizer.to_pixel(augment(model, x, target)).float()
    return torch.cat([x_pix, x_rec.clamp(0, 1), x_dat.clamp(0, 1)]).cpu()


def save_dat_preview(augment: DiscreteAdversarialAugment, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                     path: str) -> str:
    """Writes :func:`dat_preview_grid` as a PNG, one row per kind (:data:`PREVIEW_ROWS`); returns ``path``."""
    grid = dat_preview_grid(augment, model, x, target)
    save_image(make_grid(grid, nrow=x.shape[0], padding=2, pad_value=1.0), path)
    return path

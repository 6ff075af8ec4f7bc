"""Checks on the optimiser train.py builds with timm's ``create_optimizer_v2``."""
from typing import Optional

import torch

__all__ = ['check_layer_decay']


def check_layer_decay(optimizer: torch.optim.Optimizer, layer_decay: Optional[float], model_name: str = '') -> None:
    """Fails when ``--layer-decay`` would not change any learning rate.

    timm gives each parameter group an ``lr_scale`` from the model's layer grouping
    (``group_matcher``); a model it cannot group gets one scale for all, and timm only warns.

    Raises:
        ValueError: ``layer_decay`` is outside (0, 1), or every group has the same scale.

    Example:
        >>> optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.65)
        >>> check_layer_decay(optimizer, 0.65, 'vit_base_patch16_224')
    """
    if layer_decay is None:
        return
    if not 0.0 < layer_decay < 1.0:
        raise ValueError(f'--layer-decay must be in (0, 1) (MAE fine-tuning: 0.65 for ViT-B, 0.75 for ViT-L/H), '
                         f'got {layer_decay}.')
    scales = {group.get('lr_scale', 1.0) for group in optimizer.param_groups}
    if len(scales) < 2:
        raise ValueError(f'--layer-decay {layer_decay}: model {model_name!r} has no layer grouping (no '
                         f'group_matcher), so every parameter would keep the same lr; drop --layer-decay or use a '
                         f'model timm can group by layer (ViT, ConvNeXt, ResNet, EfficientNet).')

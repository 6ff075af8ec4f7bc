"""Checks on the optimiser train.py builds with timm's ``create_optimizer_v2``."""
from typing import Optional

import torch

__all__ = ['check_layer_decay', 'sync_lookahead']


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


@torch.no_grad()
def sync_lookahead(optimizer: torch.optim.Optimizer) -> None:
    """Moves a lookahead optimizer's weights to their slow (interpolated) copy, before validation and saving.

    timm's train.py calls ``optimizer.sync_lookahead()`` at the end of an epoch, but timm's ``Lookahead``
    only syncs parameters that hold a gradient, and ``zero_grad()`` has set every gradient to None by
    then (torch >= 2.0), so the call changes nothing. This does the sync timm means: each parameter with a
    slow buffer (one after the first ``k`` steps) takes one slow update and continues from it. Any other
    optimizer is left alone.

    Example:
        >>> optimizer = create_optimizer_v2(model, 'lookahead_adamw', lr=1e-3)
        >>> ...  # an epoch of steps
        >>> sync_lookahead(optimizer)  # then validate and save
    """
    base = getattr(optimizer, '_base_optimizer', None)
    if not hasattr(optimizer, 'sync_lookahead') or base is None:
        return
    for group in base.param_groups:
        for param in group['params']:
            slow = base.state[param].get('lookahead_slow_buff')
            if slow is not None:
                slow.add_(param - slow, alpha=group['lookahead_alpha'])
                param.copy_(slow)

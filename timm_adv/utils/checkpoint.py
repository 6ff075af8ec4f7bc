"""Safe, early-failing checkpoint reading.

Weights are only ever loaded with ``torch.load(weights_only=True)`` or safetensors. Every failure
names the command-line flag that supplied the path and what to do about it.
"""
import argparse
import os
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn
from timm.models import clean_state_dict

__all__ = ['CheckpointError', 'read_checkpoint', 'checkpoint_state_dict', 'state_dict_mismatch',
           'check_state_dict_matches', 'load_training_checkpoint']


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def read_checkpoint(path: str, flag: str = '--resume') -> Any:
    """Loads a checkpoint file safely (safetensors, or torch with ``weights_only=True``).

    Raises:
        CheckpointError: The file is missing or cannot be read.

    Example:
        >>> ckpt = read_checkpoint('output/train/run/last.pth.tar', '--resume')
    """
    if not path or not os.path.isfile(path):
        raise CheckpointError(f'{flag} {path!r}: no such file; give the path of an existing checkpoint.')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled code objects refused by weights_only
        raise CheckpointError(
            f'{flag} {path!r}: cannot read this checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). '
            f'It is corrupt, truncated, or not a timm/torch checkpoint; use another file '
            f'(a run keeps last.pth.tar and checkpoint-N.pth.tar).') from None


def checkpoint_state_dict(checkpoint: Any, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict inside a training checkpoint (or the checkpoint itself if it is one)."""
    if isinstance(checkpoint, Mapping):
        keys = ('state_dict_ema', 'model_ema') if ema else ('state_dict', 'model')
        for key in keys:
            if isinstance(checkpoint.get(key), Mapping):
                return clean_state_dict(checkpoint[key])
    return clean_state_dict(checkpoint)


def state_dict_mismatch(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """What separates ``state_dict`` from ``expected`` (missing/unexpected keys, shapes), or ``''`` if they match."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    detail = []
    if missing:
        detail.append(f'{len(missing)} missing keys (e.g. {missing[0]})')
    if unexpected:
        detail.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[0]})')
    if mismatched:
        k = mismatched[0]
        detail.append(f'{len(mismatched)} shape mismatches (e.g. {k}: {tuple(state_dict[k].shape)} vs '
                      f'{tuple(expected[k].shape)})')
    return '; '.join(detail)


def check_state_dict_matches(state_dict: Mapping[str, torch.Tensor],
                             model: Union[nn.Module, Mapping[str, torch.Tensor]], flag: str, arch: str = '') -> None:
    """Raises a clear error when a state dict was saved for a different architecture or set-up.

    ``model`` is the model, or the state dict it is expected to match (e.g. what a task saves).
    """
    expected = model if isinstance(model, Mapping) else model.state_dict()
    detail = state_dict_mismatch(state_dict, expected)
    if detail:
        saved = f' It was saved for {arch!r}.' if arch else ''
        raise CheckpointError(
            f'{flag}: the checkpoint does not fit this model: {detail}.{saved} Use the same --model, '
            f'--num-classes and --adv-method as the run that wrote it.')


def load_training_checkpoint(model: nn.Module, path: str, use_ema: bool = False,
                             flag: str = '--checkpoint') -> nn.Module:
    """Loads a timm-adv (or timm) training checkpoint into a freshly created plain model.

    Every timm-adv method saves the plain evaluation model under ``state_dict`` and keeps its
    training-only parts (AdvProp's auxiliary BNs, FGSM-SDI's generator) in ``task_state``, so the
    weights load strictly into the original architecture.

    Returns:
        ``model`` with the weights loaded.

    Example:
        >>> model = load_training_checkpoint(timm.create_model('resnet10t', num_classes=10), 'run/last.pth.tar')
    """
    checkpoint = read_checkpoint(path, flag)
    state_dict = checkpoint_state_dict(checkpoint, ema=use_ema)
    arch = checkpoint.get('arch', '') if isinstance(checkpoint, Mapping) else ''
    check_state_dict_matches(state_dict, model, flag, arch=arch)
    model.load_state_dict(state_dict)
    return model

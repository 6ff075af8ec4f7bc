"""Explicit control of normalisation behaviour while an attack runs.

Which statistics an attack sees is part of each method (eval statistics for Madry PGD evaluation,
batch statistics for some training recipes). Running statistics must not drift because an attack
ran, unless a method asks for it.
"""
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from timm_adv.utils.errors import ParameterError

__all__ = ['BN_MODES', 'attack_bn_mode', 'check_bn_mode']

#: ``eval``: the whole model in eval mode (running statistics, no dropout).
#: ``train``: train mode, BN normalises with batch statistics, running statistics stay frozen.
#: ``train_update``: train mode and BN running statistics are updated (only if a method wants it).
BN_MODES = ('eval', 'train', 'train_update')


def check_bn_mode(mode: str) -> str:
    if mode not in BN_MODES:
        raise ParameterError('bn_mode', f'names an unknown attack BN mode {mode!r}; choose one of '
                                        f'{", ".join(BN_MODES)}.')
    return mode


@contextmanager
def attack_bn_mode(model: nn.Module, mode: str = 'eval') -> Iterator[nn.Module]:
    """Context manager that puts ``model`` in the requested attack mode and restores it exactly.

    Args:
        model: Module to attack.
        mode: One of ``BN_MODES``.

    Example:
        >>> model = timm.create_model('resnet10t')
        >>> with attack_bn_mode(model, 'train'):
        ...     logits = model(x)  # batch statistics, running_mean/var unchanged
    """
    check_bn_mode(mode)
    training: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in model.modules()]
    frozen: List[_NormBase] = []
    try:
        if mode == 'eval':
            model.eval()
        else:
            model.train()
            if mode == 'train':
                # BN passes no running buffers to F.batch_norm when track_running_stats is off in train
                # mode, so it normalises with batch statistics and leaves running stats and counters alone.
                for m in model.modules():
                    if isinstance(m, _NormBase) and m.track_running_stats:
                        m.track_running_stats = False
                        frozen.append(m)
        yield model
    finally:
        for m in frozen:
            m.track_running_stats = True
        for m, was_training in training:
            m.training = was_training

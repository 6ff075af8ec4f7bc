"""Flags seen from the library: argparse ``type=`` callables that name the flag in their error message, and
the flags of the attack parameters.

:func:`eps_type` parses radii with the attacks' parser; :func:`~timm_adv.utils.args.bounded_type` (plain
numbers) lives in ``timm_adv.utils`` so that lower layers (``vqgan``) can use it, and is re-exported here.
"""
import argparse
from typing import Callable

from timm_adv.attacks import parse_eps
from timm_adv.utils.args import bounded_type

__all__ = ['ATTACK_FLAGS', 'eps_type', 'bounded_type']

#: Attack parameters (:class:`~timm_adv.attacks.PGDAttack`) -> the common flags that set them; a task's
#: :attr:`~timm_adv.tasks.AdversarialTask.param_flags` starts from it.
ATTACK_FLAGS = {'eps': '--adv-eps', 'steps': '--adv-steps', 'step_size': '--adv-step-size', 'norm': '--adv-norm',
                'targeted': '--adv-targeted', 'bn_mode': '--adv-bn-mode'}


def eps_type(flag: str) -> Callable[[str], float]:
    """Parses a radius such as ``0.1`` or ``4/255`` (must be > 0)."""
    def _parse(value):
        try:
            return parse_eps(value, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    _parse.__name__ = 'eps'
    return _parse

"""Building attacks from command-line style arguments."""
from fractions import Fraction
from typing import Optional, Union

from timm_adv.utils.errors import ParameterError

from .pgd import PGDAttack

__all__ = ['parse_eps', 'create_attack']


def parse_eps(value: Union[str, float, int], flag: str = '--adv-eps') -> float:
    """Parses an attack radius written as a number or a fraction such as ``4/255``.

    ``flag`` is the name a bad value's :class:`~timm_adv.utils.ParameterError` gives: the flag the value
    came from, or the parameter's name.

    Example:
        >>> parse_eps('8/255')
        0.03137254901960784
    """
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(Fraction(text)) if '/' in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ParameterError(flag, f'cannot be read from {value!r}: write a number, e.g. 0.1 or 4/255.') from None
    if not out > 0:
        raise ParameterError(flag, f'must be > 0, got {value}; write e.g. 8/255.')
    return out


def create_attack(
        eps: Union[str, float],
        steps: int = 10,
        step_size: Optional[Union[str, float]] = None,
        norm: str = 'linf',
        random_start: bool = True,
        targeted: Optional[str] = None,
        bn_mode: str = 'eval',
        mean=None,
        std=None,
        restarts: int = 1,
        **kwargs,
) -> PGDAttack:
    """Creates a :class:`PGDAttack` (FGSM when ``steps == 1``) from loose arguments.

    ``eps`` and ``step_size`` accept fractions such as ``'4/255'``.

    Example:
        >>> attack = create_attack('4/255', steps=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    eps = parse_eps(eps, 'eps')
    if step_size is not None:
        step_size = parse_eps(step_size, 'step_size')
    if targeted in ('none', ''):
        targeted = None
    return PGDAttack(
        eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=random_start, targeted=targeted,
        bn_mode=bn_mode, mean=mean, std=std, restarts=restarts, **kwargs)

"""argparse ``type=`` callables that name the flag in their error message."""
import argparse
from typing import Callable

from timm_adv.attacks import parse_eps

__all__ = ['eps_type', 'bounded_type']


def eps_type(flag: str) -> Callable[[str], float]:
    """Parses a radius such as ``0.1`` or ``4/255`` (must be > 0)."""
    def _parse(value):
        try:
            return parse_eps(value, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    _parse.__name__ = 'eps'
    return _parse


def bounded_type(flag: str, cast: type, minimum) -> Callable[[str], float]:
    """Parses ``cast(value)`` and requires it to be ``>= minimum``.

    Example:
        >>> parser.add_argument('--adv-steps', type=bounded_type('--adv-steps', int, 1))
    """
    def _parse(value):
        try:
            out = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{flag} must be a {cast.__name__}, got {value!r}.') from None
        if not out >= minimum:
            raise argparse.ArgumentTypeError(f'{flag} must be >= {minimum}, got {value}.')
        return out
    _parse.__name__ = cast.__name__
    return _parse

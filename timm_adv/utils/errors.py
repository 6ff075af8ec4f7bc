"""Errors of library parameters, renamed to the command-line flags that set them.

Library classes (attacks, kNN settings, augmentations) raise :class:`ParameterError` naming their own
parameter. The layer that parsed the flags builds them inside :func:`flag_errors`, which re-raises the
error naming the flag instead: a library caller reads ``eps must be > 0``, a user ``--adv-advbn-eps
must be > 0``.
"""
import contextlib
from typing import Iterator, Mapping

__all__ = ['ParameterError', 'flag_errors']


class ParameterError(ValueError):
    """A bad value of the parameter ``param``; the message is ``f'{param} {problem}'``.

    Example:
        >>> raise ParameterError('eps', 'must be > 0, got 0.')
        ParameterError: eps must be > 0, got 0.
    """

    def __init__(self, param: str, problem: str):
        super().__init__(f'{param} {problem}')
        self.param = param
        self.problem = problem


@contextlib.contextmanager
def flag_errors(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raises a :class:`ParameterError` of a parameter in ``flags`` (``{param: flag}``) naming the flag.

    Example:
        >>> with flag_errors({'eps': '--adv-advbn-eps'}):
        ...     FeatureStatsAttack(eps=0)
        ValueError: --adv-advbn-eps must be > 0, got 0 (the paper uses 1.1).
    """
    try:
        yield
    except ParameterError as e:
        if e.param not in flags:
            raise
        raise ValueError(f'{flags[e.param]} {e.problem}') from None

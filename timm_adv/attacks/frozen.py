"""Model parameters out of the autograd graph while an attack differentiates w.r.t. its input.

Eager autograd computes only what ``torch.autograd.grad(loss, delta)`` asks for, but a
``torch.compile``-d model runs one compiled backward that computes every gradient its graph was
traced with, weight gradients included. Attack passes therefore run with the parameters'
``requires_grad`` off: the compiled attack graph is traced with input gradients only (once, then
reused every step), and eager passes are unchanged.
"""
from contextlib import contextmanager
from typing import Iterator, List

import torch
import torch.nn as nn

__all__ = ['frozen_parameters']


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that turns ``requires_grad`` off for every parameter of ``model``, restored on exit.

    Gradients w.r.t. inputs (and w.r.t. other modules' parameters, e.g. a generator feeding ``model``)
    still flow through ``model``.

    Example:
        >>> with frozen_parameters(model):
        ...     grad, = torch.autograd.grad(model(x + delta).sum(), delta)   # compiled: no weight gradients
    """
    frozen: List[torch.nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)

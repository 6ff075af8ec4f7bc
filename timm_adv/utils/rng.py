"""Every process's random-number state, kept in checkpoints so that a resumed run replays the killed one.

timm's train.py seeds once at start-up; a resumed run then draws other shuffles, augmentations and
random starts than the uninterrupted run would have. Saving each process's Python, NumPy, torch (and
CUDA) generator states with a checkpoint, and restoring them before the next epoch, keeps timm's
stream for an uninterrupted run and replays it exactly after ``--resume``.
"""
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from timm.utils import CheckpointSaver

__all__ = ['ReplayCheckpointSaver', 'get_rng_state', 'set_rng_state', 'gather_rng_states']


def get_rng_state() -> Dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` reads back.

    Example:
        >>> state = get_rng_state(); torch.rand(1); set_rng_state(state)  # the same draw again
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'numpy': (name, keys.tolist(), pos, has_gauss, cached),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores the states :func:`get_rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states(distributed: bool = False) -> List[Dict[str, Any]]:
    """Every process's states, by rank (a collective under ``torch.distributed``: call it on every rank)."""
    state = get_rng_state()
    if not distributed:
        return [state]
    states: List[Optional[Dict[str, Any]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class ReplayCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` that also writes ``rng_states`` (one per rank) into the saver's bookkeeping.

    Set :attr:`rng_states` (from :func:`gather_rng_states`) right before ``save_checkpoint``; recovery
    checkpoints, saved mid-epoch, carry none.

    Example:
        >>> saver.rng_states = gather_rng_states(args.distributed)
        >>> saver.save_checkpoint(epoch, metric=top1)
    """
    rng_states: Optional[List[Dict[str, Any]]] = None

    def state_dict(self, epoch=None, metric=None):
        state = super().state_dict(epoch, metric)
        if self.rng_states is not None:
            state['rng_states'] = self.rng_states
        return state

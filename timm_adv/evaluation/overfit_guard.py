"""Catastrophic-overfitting guard for fast (single-step) adversarial training.

Fast AT can collapse within an epoch: the model learns to mask the single-step gradient, so FGSM
accuracy climbs while multi-step PGD accuracy falls toward zero (Wong et al. 2020; Jia et al.
2022). The guard measures PGD and FGSM accuracy on a fixed held-out set after each epoch and
flags a collapse when

* PGD accuracy is at least ``min_pgd_drop`` points below the best PGD accuracy seen so far, and
* FGSM accuracy is not below its value at that best epoch (it held or rose while PGD fell).

A collapse is logged as a WARNING, recorded in the epoch metrics (``guard_pgd_top1``,
``guard_fgsm_top1``, ``co_detected``; ``summary.csv`` prefixes them with ``eval_``) and, depending
on ``action``, training goes on (``warn``), stops after the epoch is saved (``stop``) or rolls back
the model, optimiser, task state and EMA to the last epoch without collapse (``rollback``; the
snapshot is kept on the CPU, so resuming a run restarts the guard's history).
"""
import argparse
import copy
import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from timm_adv.attacks import PGDAttack, unwrap_ddp
from .accuracy import evaluate_accuracy

__all__ = ['CO_ACTIONS', 'GuardRecord', 'OverfitGuard', 'detect_collapse', 'add_overfit_guard_args',
           'check_overfit_guard_args', 'create_overfit_guard', 'guard_enabled']

_logger = logging.getLogger(__name__)

CO_ACTIONS = ('warn', 'stop', 'rollback')


class GuardRecord:
    """Held-out PGD and FGSM accuracy (percent) of one epoch."""

    def __init__(self, epoch: int, pgd_top1: float, fgsm_top1: float, collapsed: bool = False):
        self.epoch = epoch
        self.pgd_top1 = pgd_top1
        self.fgsm_top1 = fgsm_top1
        self.collapsed = collapsed

    def __repr__(self) -> str:
        return (f'GuardRecord(epoch={self.epoch}, pgd_top1={self.pgd_top1:.2f}, fgsm_top1={self.fgsm_top1:.2f}, '
                f'collapsed={self.collapsed})')


def detect_collapse(history: List[GuardRecord], pgd_top1: float, fgsm_top1: float,
                    min_pgd_drop: float = 10.0) -> Optional[GuardRecord]:
    """The best earlier epoch a collapse is measured against, or None when there is no collapse.

    Collapse: PGD accuracy at least ``min_pgd_drop`` points below the best earlier PGD accuracy while
    FGSM accuracy is at least what it was at that best epoch.

    Example:
        >>> detect_collapse([GuardRecord(0, 40.0, 55.0)], pgd_top1=3.0, fgsm_top1=80.0)
        GuardRecord(epoch=0, pgd_top1=40.00, fgsm_top1=55.00, collapsed=False)
    """
    if not history:
        return None
    best = max(history, key=lambda r: r.pgd_top1)
    if pgd_top1 <= best.pgd_top1 - min_pgd_drop and fgsm_top1 >= best.fgsm_top1:
        return best
    return None


def _cpu_copy(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class OverfitGuard:
    """Watches held-out PGD vs FGSM accuracy each epoch and reacts to catastrophic overfitting.

    Args:
        loader: Fixed held-out batches ``(input, target)`` (e.g. a slice of the validation split).
        pgd_attack: Multi-step attack whose accuracy collapses under catastrophic overfitting.
        fgsm_attack: Single-step attack whose accuracy holds or rises under it.
        action: ``warn``, ``stop`` or ``rollback`` (see the module docstring).
        min_pgd_drop: PGD accuracy drop (points) below the best epoch that counts as a collapse.
        device: Device batches are moved to.
        amp_autocast: Autocast context factory for the evaluation.

    Example:
        >>> guard = OverfitGuard(loader, PGDAttack(8 / 255, 10, mean=m, std=s),
        ...                      PGDAttack(8 / 255, 1, random_start=False, mean=m, std=s), action='rollback')
        >>> for epoch in range(epochs):
        ...     train_one_epoch(...)
        ...     metrics = guard.check(epoch, task, optimizer)   # {'guard_pgd_top1', 'guard_fgsm_top1', 'co_detected'}
        ...     if guard.act(task, optimizer):
        ...         break
    """

    def __init__(
            self,
            loader,
            pgd_attack: PGDAttack,
            fgsm_attack: PGDAttack,
            action: str = 'warn',
            min_pgd_drop: float = 10.0,
            device: Optional[torch.device] = None,
            amp_autocast: Callable = nullcontext,
    ):
        if action not in CO_ACTIONS:
            raise ValueError(f'--adv-co-action must be one of {", ".join(CO_ACTIONS)}, got {action!r}.')
        if not min_pgd_drop > 0:
            raise ValueError(f'--adv-co-drop must be > 0 accuracy points, got {min_pgd_drop}.')
        self.loader = loader
        self.pgd_attack = pgd_attack
        self.fgsm_attack = fgsm_attack
        self.action = action
        self.min_pgd_drop = float(min_pgd_drop)
        self.device = device
        self.amp_autocast = amp_autocast
        self.history: List[GuardRecord] = []
        self.collapsed = False
        self._snapshot: Optional[Dict[str, Any]] = None

    def _accuracy(self, model: nn.Module, attack: PGDAttack) -> float:
        return evaluate_accuracy(model, self.loader, attack=attack, device=self.device,
                                 amp_autocast=self.amp_autocast)['top1']

    def check(self, epoch: int, task, optimizer: Optional[torch.optim.Optimizer] = None,
              pgd_top1: Optional[float] = None) -> Dict[str, float]:
        """Measures the epoch, records it, warns on collapse; returns its metrics for ``summary.csv``.

        With ``action='rollback'`` a healthy epoch's model, optimiser and task state become the snapshot
        to roll back to. ``pgd_top1``: PGD accuracy already measured on the guard's loader with its
        PGD attack this epoch (train.py's robust validation), so it is not computed twice.
        """
        model = unwrap_ddp(task.get_eval_model())
        was_training = model.training
        pgd = self._accuracy(model, self.pgd_attack) if pgd_top1 is None else pgd_top1
        fgsm = self._accuracy(model, self.fgsm_attack)
        model.train(was_training)
        best = detect_collapse(self.history, pgd, fgsm, self.min_pgd_drop)
        self.collapsed = best is not None
        self.history.append(GuardRecord(epoch, pgd, fgsm, self.collapsed))
        if self.collapsed:
            _logger.warning(
                f'CATASTROPHIC OVERFITTING at epoch {epoch}: held-out PGD accuracy fell to {pgd:.2f}% from '
                f'{best.pgd_top1:.2f}% (epoch {best.epoch}) while FGSM accuracy is {fgsm:.2f}% (was '
                f'{best.fgsm_top1:.2f}%). Action: {self.action}' + (
                    '' if self.action != 'warn' else ' (pass --adv-co-action stop or rollback to react)'))
        elif self.action == 'rollback':
            self._remember(task, optimizer)
        return {'guard_pgd_top1': pgd, 'guard_fgsm_top1': fgsm, 'co_detected': float(self.collapsed)}

    def act(self, task, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Applies ``action`` after a collapse found by the last :meth:`check`; True means stop training."""
        if not self.collapsed or self.action == 'warn':
            return False
        if self.action == 'stop':
            _logger.warning('Stopping training after catastrophic overfitting (--adv-co-action stop).')
            return True
        if self._snapshot is None:
            _logger.warning('No epoch before the collapse to roll back to; training goes on (--adv-co-action '
                            'rollback).')
            return False
        snap = self._snapshot
        task.unwrapped_model.load_state_dict(snap['model'])
        if optimizer is not None and snap['optimizer'] is not None:
            optimizer.load_state_dict(snap['optimizer'])
        task.load_task_state(snap['task'] or None)
        if snap['ema'] is not None and task.has_ema():
            task.get_trainable_module(ema=True).load_state_dict(snap['ema'])
        _logger.warning(f'Rolled back model, optimizer and task state to epoch {snap["epoch"]} '
                        f'(--adv-co-action rollback).')
        return False

    def _remember(self, task, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self._snapshot = {
            'epoch': self.history[-1].epoch,
            'model': _cpu_copy(task.unwrapped_model.state_dict()),
            'optimizer': None if optimizer is None else _cpu_copy(optimizer.state_dict()),
            'task': _cpu_copy(task.get_task_state()),
            'ema': _cpu_copy(task.get_trainable_module(ema=True).state_dict()) if task.has_ema() else None,
        }


def add_overfit_guard_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--adv-co-*`` flags of the catastrophic-overfitting guard."""
    group = parser.add_argument_group('Catastrophic-overfitting guard')
    group.add_argument('--adv-co-guard', action=argparse.BooleanOptionalAction, default=None,
                       help='each epoch, compare PGD and FGSM accuracy on a fixed held-out subset of the validation '
                            'split to detect catastrophic overfitting (default: on for single-step methods such '
                            'as fgsm-sdi and fgsm-rs, off otherwise)')
    group.add_argument('--adv-co-action', choices=CO_ACTIONS, default='warn',
                       help='on collapse: warn, stop after saving the epoch, or rollback to the last healthy epoch '
                            '(default: warn)')
    group.add_argument('--adv-co-drop', type=float, default=10.0, metavar='POINTS',
                       help='PGD accuracy drop below the best epoch, in points, that signals a collapse when FGSM '
                            'accuracy did not fall (default: 10)')


def guard_enabled(args: argparse.Namespace) -> bool:
    """``--adv-co-guard`` / ``--no-adv-co-guard``; unset, the method's default (on for single-step methods),
    which :func:`~timm_adv.tasks.check_adv_args` fills in."""
    return bool(args.adv_co_guard)


def check_overfit_guard_args(args: argparse.Namespace, explicit: Optional[Mapping[str, str]] = None) -> None:
    """Fails early on guard flags that cannot work or would be ignored.

    Args:
        args: Parsed arguments.
        explicit: The flags the user set, ``{dest: flag}`` (see :func:`timm_adv.utils.explicit_args`).
    """
    explicit = explicit or {}
    if not guard_enabled(args):
        for dest in ('adv_co_action', 'adv_co_drop'):
            if dest in explicit:
                raise ValueError(f'{explicit[dest]} does nothing: the catastrophic-overfitting guard is off for '
                                 f'--adv-method {args.adv_method}; add --adv-co-guard to turn it on.')
    elif args.adv_val_samples == 0:
        raise ValueError('The catastrophic-overfitting guard watches the robust validation subset: set '
                         '--adv-val-samples >= 1, or pass --no-adv-co-guard.')


def create_overfit_guard(
        args: argparse.Namespace,
        loader_robust,
        pgd_attack: PGDAttack,
        mean=None,
        std=None,
        device: Optional[torch.device] = None,
        amp_autocast: Callable = nullcontext,
) -> Optional[OverfitGuard]:
    """The guard configured by the ``--adv-co-*`` flags, or None when it is disabled.

    It watches the robust-validation subset train.py already attacks each epoch (``--adv-val-samples``
    evenly spaced validation images, ``pgd_attack``), so its PGD accuracy is the epoch's ``pgd_top1``
    and only the FGSM pass is extra.
    """
    if not guard_enabled(args):
        return None
    check_overfit_guard_args(args)
    fgsm = PGDAttack(pgd_attack.eps, steps=1, norm=pgd_attack.norm, random_start=False, bn_mode='eval', mean=mean,
                     std=std)
    return OverfitGuard(loader_robust, pgd_attack, fgsm, action=args.adv_co_action, min_pgd_drop=args.adv_co_drop,
                        device=device, amp_autocast=amp_autocast)

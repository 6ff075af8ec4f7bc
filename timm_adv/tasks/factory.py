"""Command-line flags shared by all methods, and the task factory used by ``train.py``."""
import argparse
from functools import lru_cache
from typing import Callable, FrozenSet, Mapping, Optional, Union

import torch
import torch.nn as nn

from timm_adv.attacks import BN_MODES, NORMS
from timm_adv.utils.errors import flag_errors
from .arg_types import bounded_type, eps_type
from .distill import add_kd_args, check_kd_args, distilled_method
from .registry import get_method, list_methods

__all__ = ['add_adv_args', 'check_adv_args', 'create_task', 'method_args', 'method_arg_dests']


def add_adv_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--adv-*`` groups: the common attack flags, then a group of each method's own flags.

    Unset attack flags fall back to the chosen method's defaults (``attack_defaults``).
    """
    group = parser.add_argument_group('Adversarial training parameters')
    group.add_argument('--adv-method', default='none', metavar='NAME',
                       help=f'adversarial training method, one of: {", ".join(list_methods())} (default: none)')
    group.add_argument('--adv-eps', type=eps_type('--adv-eps'), default=None, metavar='EPS',
                       help='attack radius in pixel units [0,1], e.g. 8/255 (default: per method)')
    group.add_argument('--adv-steps', type=bounded_type('--adv-steps', int, 1), default=None, metavar='K',
                       help='attack steps; 1 is FGSM (default: per method)')
    group.add_argument('--adv-step-size', type=eps_type('--adv-step-size'), default=None, metavar='ALPHA',
                       help='attack step size (default: eps for 1 step, 2.5*eps/steps otherwise)')
    group.add_argument('--adv-norm', choices=NORMS, default=None, help='threat model norm (default: linf)')
    group.add_argument('--adv-random-start', action=argparse.BooleanOptionalAction, default=None,
                       help='start the attack from a random point of the eps ball (default: per method)')
    group.add_argument('--adv-targeted', choices=('none', 'random', 'least_likely'), default=None,
                       help='targeted attack toward a random or the least-likely class (default: per method)')
    group.add_argument('--adv-bn-mode', choices=BN_MODES, default=None,
                       help='BN behaviour while the training attack runs: eval statistics, batch statistics with '
                            'frozen running stats (train), or updated stats (train_update) (default: per method)')
    group.add_argument('--adv-attack-amp', action='store_true', default=False,
                       help='run the training attack under the --amp autocast instead of fp32: faster, but under '
                            'fp16 no loss scaler guards its input gradient (prefer --amp-dtype bfloat16); the '
                            'official codes of DAT and PGD-AT attack in fp32 (default: fp32)')
    group.add_argument('--adv-val-steps', type=bounded_type('--adv-val-steps', int, 1), default=10, metavar='K',
                       help='PGD steps of the per-epoch robust validation (default: 10)')
    group.add_argument('--adv-val-eps', type=eps_type('--adv-val-eps'), default=None, metavar='EPS',
                       help='eps of the per-epoch robust validation (default: training eps, or 8/255)')
    group.add_argument('--adv-val-samples', type=int, default=None, metavar='N',
                       help='size of the fixed validation subset attacked each epoch; 0 disables (default: 500 '
                            'with an adversarial method, 0 with --adv-method none, i.e. timm\'s validation only)')
    for name in list_methods():  # a help section per method (one with no flags of its own shows none)
        get_method(name).add_args(parser.add_argument_group(f'--adv-method {name} parameters'))
    add_kd_args(parser)


@lru_cache(maxsize=None)
def method_args(name: str) -> FrozenSet[str]:
    """Destinations of the flags the method ``name`` creates in its ``add_args``.

    Recorded by running its ``add_args`` on a scratch parser, so a new method's ``--adv-<method>-*``
    flags are known to :func:`check_adv_args` without being listed anywhere.

    Example:
        >>> sorted(method_args('advprop'))
        ['adv_advprop_adv_weight', 'adv_advprop_clean_weight']
    """
    scratch = argparse.ArgumentParser(add_help=False)
    get_method(name).add_args(scratch.add_argument_group())
    return frozenset(a.dest for a in scratch._actions)


def method_arg_dests(name: str) -> FrozenSet[str]:
    """Destinations of every flag the method ``name`` reads: the common attack flags its task class lists in
    ``uses_args`` (with ``adv_attack_amp`` when it has a training attack) and the flags of its own ``add_args``.

    Example:
        >>> sorted(method_arg_dests('pgd'))[:3]
        ['adv_attack_amp', 'adv_bn_mode', 'adv_clean_weight']
    """
    method = get_method(name)
    return frozenset(method.uses_args) | method_args(name) | ({'adv_attack_amp'} if method.uses_args else set())


def _methods_using(dest: str):
    return [n for n in list_methods() if dest in method_args(n) or dest in get_method(n).uses_args]


def check_adv_args(args: argparse.Namespace, explicit: Optional[Mapping[str, str]] = None) -> None:
    """Fails early, naming the flag, on adversarial settings that cannot work or would be ignored.

    Args:
        args: Parsed arguments.
        explicit: The flags the user set, ``{dest: flag}`` (see :func:`timm_adv.utils.explicit_args`).
            A method flag set for a method that does not read it is an error: the common attack flags
            the task class does not list in ``uses_args``, and the flags other methods' ``add_args`` create.

    Unset flags with per-method defaults are resolved here: ``--adv-val-samples`` (500 with an adversarial
    method, 0 with ``none``) and ``--adv-co-guard`` (the method's :attr:`~AdversarialTask.co_guard_default`).

    Example:
        >>> check_adv_args(args, explicit_args(parser, argv))
        ValueError: --adv-clean-weight does nothing with --adv-method advprop; it applies to pgd, fgsm-rs. ...
    """
    method = get_method(args.adv_method)
    explicit = explicit or {}
    if args.adv_val_samples is None:  # plain training validates as timm's train.py does, adding no attack
        args.adv_val_samples = 0 if args.adv_method == 'none' else 500
    if getattr(args, 'adv_co_guard', False) is None:
        args.adv_co_guard = method.co_guard_default
    with flag_errors(method.param_flags):
        method.check_args(args)
    check_kd_args(args, explicit)
    if args.adv_val_samples < 0:
        raise ValueError(f'--adv-val-samples must be >= 0, got {args.adv_val_samples}.')
    used = method_arg_dests(args.adv_method)
    for dest, flag in explicit.items():
        users = _methods_using(dest)
        if dest in used or not users:
            continue
        hint = ' (the robust validation radius is --adv-val-eps)' if dest == 'adv_eps' else ''
        own = f' {args.adv_method} has {method.arg_hints[dest]} instead.' if dest in method.arg_hints else ''
        raise ValueError(f'{flag} does nothing with --adv-method {args.adv_method}; it applies to '
                         f'{", ".join(users)}{hint}.{own} Drop it, or pick one of those methods.')
    if 'adv_attack_amp' in explicit and not method.uses_args:  # the methods without a training attack
        raise ValueError(f'--adv-attack-amp does nothing with --adv-method {args.adv_method} (no training attack); '
                         f'drop it.')
    if getattr(args, 'adv_attack_amp', False) and not getattr(args, 'amp', False):
        raise ValueError('--adv-attack-amp runs the attack under the --amp autocast, but --amp is off: add --amp or '
                         'drop --adv-attack-amp.')
    if args.adv_val_samples == 0:
        for dest in ('adv_val_steps', 'adv_val_eps'):
            if dest in explicit:
                raise ValueError(f'{explicit[dest]} does nothing with --adv-val-samples 0 (no robust validation); '
                                 f'drop it, or attack a subset with --adv-val-samples N.')
        if 'pgd_top1' in getattr(args, 'eval_metric', ''):
            raise ValueError(f'--eval-metric {args.eval_metric} needs the per-epoch robust validation, which '
                             f'--adv-val-samples 0 turns off; set --adv-val-samples N or rank by top1.')


def create_task(
        model: nn.Module,
        criterion: Union[nn.Module, Callable],
        args: argparse.Namespace,
        mean=None,
        std=None,
        device: Optional[torch.device] = None,
        teacher=None,
):
    """Creates the task registered under ``args.adv_method``; with ``--kd-model-name``, with that teacher.

    ``teacher`` (a :class:`~timm.task.DistillationTeacher` from
    :func:`~timm_adv.tasks.distill.create_teacher`) is used as is; without it the task builds its own.

    Example:
        >>> model = get_method(args.adv_method).prepare_model(model, args)
        >>> task = create_task(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    method = get_method(args.adv_method)
    with flag_errors(method.param_flags):  # errors of the attack & co. name the flags the user typed
        if getattr(args, 'kd_model_name', None):
            return distilled_method(method).from_args(model, criterion, args, mean=mean, std=std, device=device,
                                                      teacher=teacher)
        return method.from_args(model, criterion, args, mean=mean, std=std, device=device)

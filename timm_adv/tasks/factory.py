"""Command-line flags shared by all methods, and the task factory used by ``train.py``."""
import argparse
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from timm_adv.attacks import BN_MODES, NORMS
from .arg_types import bounded_type, eps_type
from .registry import get_method, list_methods

__all__ = ['add_adv_args', 'check_adv_args', 'create_task']


def add_adv_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--adv-*`` group (common attack flags, then each method's own flags).

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
    group.add_argument('--adv-val-steps', type=bounded_type('--adv-val-steps', int, 1), default=10, metavar='K',
                       help='PGD steps of the per-epoch robust validation (default: 10)')
    group.add_argument('--adv-val-eps', type=eps_type('--adv-val-eps'), default=None, metavar='EPS',
                       help='eps of the per-epoch robust validation (default: training eps, or 8/255)')
    group.add_argument('--adv-val-samples', type=int, default=500, metavar='N',
                       help='size of the fixed validation subset attacked each epoch; 0 disables (default: 500)')
    for name in list_methods():
        get_method(name).add_args(group)


def check_adv_args(args: argparse.Namespace) -> None:
    """Fails early, naming the flag, on adversarial settings that cannot work."""
    get_method(args.adv_method)
    for name in list_methods():
        get_method(name).check_args(args)
    if args.adv_val_samples < 0:
        raise ValueError(f'--adv-val-samples must be >= 0, got {args.adv_val_samples}.')


def create_task(
        model: nn.Module,
        criterion: Union[nn.Module, Callable],
        args: argparse.Namespace,
        mean=None,
        std=None,
        device: Optional[torch.device] = None,
):
    """Creates the task registered under ``args.adv_method``.

    Example:
        >>> model = get_method(args.adv_method).prepare_model(model, args)
        >>> task = create_task(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    """
    return get_method(args.adv_method).from_args(model, criterion, args, mean=mean, std=std, device=device)

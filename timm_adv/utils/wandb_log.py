"""``--log-wandb``: the per-epoch row of ``summary.csv``, plus the method's step cost, sent to Weights & Biases."""
import argparse
import importlib
from typing import Mapping, Optional

__all__ = ['WandbLogger', 'create_wandb_logger', 'import_wandb']


class WandbLogger:
    """Logs one row per epoch to a wandb run, in timm's layout (``train_*``, ``eval_*``, ``lr``).

    The row holds what ``summary.csv`` holds (clean and adversarial train metrics, clean and PGD
    validation accuracy, the overfitting guard's columns) and the cost of the method's step
    (``cost_*``: seconds per optimizer update and per training sample), which ``summary.csv`` omits.

    Example:
        >>> logger = WandbLogger(wandb_module.init(project='adv'))
        >>> logger.log_epoch(0, {'loss': 2.3}, {'top1': 41.0, 'pgd_top1': 12.5}, lr=0.1, step_cost={'update_s': 0.4})
    """

    def __init__(self, run):
        self.run = run

    def log_epoch(self, epoch: int, train_metrics: Mapping[str, float], eval_metrics: Mapping[str, float],
                  lr: Optional[float] = None, step_cost: Optional[Mapping[str, float]] = None) -> None:
        row = {'epoch': epoch}
        row.update((f'train_{k}', v) for k, v in train_metrics.items())
        row.update((f'eval_{k}', v) for k, v in eval_metrics.items())
        row.update((f'cost_{k}', v) for k, v in (step_cost or {}).items())
        if lr is not None:
            row['lr'] = lr
        self.run.log(row, step=epoch)

    def finish(self) -> None:
        self.run.finish()


def import_wandb():
    """The ``wandb`` module; a clear error naming the extra when it is not installed (timm only warns)."""
    try:
        return importlib.import_module('wandb')
    except ImportError:
        raise ValueError("--log-wandb needs the wandb package: pip install 'timm-adv[wandb]' (or pip install wandb), "
                         "or drop --log-wandb.") from None


def create_wandb_logger(args: argparse.Namespace, name: str) -> WandbLogger:
    """Starts the wandb run of ``--log-wandb`` (timm's project, tags and resume flags).

    Example:
        >>> logger = create_wandb_logger(args, name='20260101-120000-resnet10t-32')
    """
    run = import_wandb().init(
        project=args.wandb_project, name=name, config=vars(args), tags=args.wandb_tags,
        resume='must' if args.wandb_resume_id else None, id=args.wandb_resume_id or None)
    return WandbLogger(run)

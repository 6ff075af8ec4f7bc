"""The per-epoch validation of a training run, recorded with its protocol for the model card.

``train.py`` validates every epoch: clean top-1 on the validation split and, for adversarial methods,
PGD top-1 on a fixed, evenly spaced subset of it. :func:`validation_protocol` describes how (split,
attack, eps, steps, step size, samples) and the checkpoint saver stores it with the epoch's figures
(``checkpoint['saver']['validation']``). :func:`read_validation` gives that record back, and for
checkpoints written before it existed rebuilds it from the run's ``summary.csv`` and training arguments.

Example:
    >>> protocol = validation_protocol(args, loader_eval, loader_robust, val_attack)
    >>> saver.validation = dict(epoch=epoch, metrics=eval_metrics, protocol=protocol)
"""
import csv
import os
from typing import Any, Dict, List, Mapping, Optional

from timm_adv.attacks import create_attack

__all__ = ['validation_protocol', 'read_validation', 'validation_rows']


def _num_samples(loader) -> Optional[int]:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):  # iterable datasets have no length
        return None


def _dataset_name(args) -> str:
    """``--dataset``, or the name of the ``--data-dir`` folder (a card names no path of the training machine)."""
    data_dir = getattr(args, 'data_dir', None)
    return str(getattr(args, 'dataset', None) or (os.path.basename(os.path.normpath(data_dir)) if data_dir else ''))


def _attack_protocol(attack, samples: Optional[int]) -> Dict[str, Any]:
    return dict(name=f'PGD-{attack.steps}', norm=attack.norm, eps=float(attack.eps), steps=int(attack.steps),
                step_size=float(attack.step_size), random_start=bool(attack.random_start), samples=samples,
                subset='evenly spaced')


def validation_protocol(args, loader_eval, loader_robust, val_attack) -> Dict[str, Any]:
    """How ``train.py`` validates each epoch: the split, its size, and the robust attack on its subset.

    Args:
        args: Training arguments (``dataset`` / ``data_dir``, ``val_split``).
        loader_eval: The clean validation loader.
        loader_robust: The robust-validation loader (None: no robust validation).
        val_attack: The per-epoch PGD attack.

    Example:
        >>> validation_protocol(args, loaders.eval, loaders.robust, val_attack)['robust']['name']
        'PGD-10'
    """
    protocol = dict(dataset=_dataset_name(args), split=getattr(args, 'val_split', None),
                    samples=_num_samples(loader_eval), robust=None)
    if loader_robust is not None:
        protocol['robust'] = _attack_protocol(val_attack, _num_samples(loader_robust))
    return protocol


def _summary_row(folder: str, epoch: int) -> Optional[Dict[str, str]]:
    path = os.path.join(folder, 'summary.csv')
    if not os.path.isfile(path):
        return None
    with open(path, newline='') as f:
        rows = [r for r in csv.DictReader(f) if r.get('epoch') == str(epoch)]
    return rows[-1] if rows else None


def _from_summary(checkpoint: Mapping, path: str, default_eps: float) -> Optional[Dict[str, Any]]:
    """The record of a checkpoint saved before records existed: its ``summary.csv`` row and arguments."""
    args, epoch = checkpoint.get('args'), checkpoint.get('epoch')
    row = _summary_row(os.path.dirname(os.path.abspath(path)), epoch) if epoch is not None else None
    if row is None or args is None:
        return None
    metrics = {k[len('eval_'):]: float(v) for k, v in row.items() if k.startswith('eval_') and v not in ('', None)}
    protocol = dict(dataset=_dataset_name(args), split=getattr(args, 'val_split', None), samples=None, robust=None)
    if 'pgd_top1' in metrics:
        attack = create_attack(eps=getattr(args, 'adv_val_eps', None) or getattr(args, 'adv_eps', None) or default_eps,
                               steps=args.adv_val_steps, norm=getattr(args, 'adv_norm', None) or 'linf',
                               random_start=True, bn_mode='eval')
        protocol['robust'] = _attack_protocol(attack, getattr(args, 'adv_val_samples', None))
    return dict(epoch=epoch, metrics=metrics, protocol=protocol, source='summary.csv')


def read_validation(checkpoint: Mapping, path: str, default_eps: float = 8 / 255) -> Optional[Dict[str, Any]]:
    """The validation figures of a checkpoint's epoch with their protocol (None: no record and no summary).

    Args:
        checkpoint: The loaded training checkpoint.
        path: Its file (older checkpoints: ``summary.csv`` is read beside it).
        default_eps: The method's training eps, the robust validation radius when neither
            ``--adv-val-eps`` nor ``--adv-eps`` was set (older checkpoints only).

    Example:
        >>> read_validation(torch.load(path, weights_only=False), path)['metrics']['pgd_top1']
        94.5
    """
    record = (checkpoint.get('saver') or {}).get('validation')
    if record:
        return dict(record, source='checkpoint')
    return _from_summary(checkpoint, path, default_eps)


def validation_rows(record: Mapping) -> List[Dict[str, Any]]:
    """The record as report-like rows: evaluation, setting, samples (None: the whole split), top-1."""
    protocol, metrics = record['protocol'], record['metrics']
    split = f'{protocol.get("dataset") or "validation data"}, split {protocol.get("split")!r}'
    rows = [dict(evaluation='Clean', setting=split, samples=protocol.get('samples'), top1=metrics['top1'])]
    robust = protocol.get('robust')
    if robust and 'pgd_top1' in metrics:
        setting = (f'{robust["norm"]} eps={robust["eps"]:.4g}, step={robust["step_size"]:.4g}, '
                   f'{"random start, " if robust.get("random_start") else ""}{robust.get("subset", "")} subset')
        rows.append(dict(evaluation=robust['name'], setting=setting, samples=robust.get('samples'),
                         top1=metrics['pgd_top1']))
    return rows

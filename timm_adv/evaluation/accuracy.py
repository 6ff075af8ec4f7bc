"""Clean and adversarial accuracy over a loader."""
import logging
import time
from contextlib import nullcontext
from typing import Callable, Dict, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm.data import create_dataset, create_loader

from timm_adv.attacks import PGDAttack
from timm_adv.data import spread_subset
from timm_adv.utils import ProgressLog

__all__ = ['evaluate_accuracy', 'evaluate_folder']

_logger = logging.getLogger(__name__)


def evaluate_accuracy(
        model: nn.Module,
        loader,
        attack: Optional[PGDAttack] = None,
        device: Optional[torch.device] = None,
        amp_autocast: Callable = nullcontext,
        max_samples: Optional[int] = None,
        log_interval: int = 0,
        log_prefix: str = 'Test',
        channels_last: bool = False,
        on_output: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean CE loss, on clean or attacked inputs.

    The model runs in eval mode. Counts are summed over processes when ``torch.distributed`` is
    initialised, so uneven shards are exact. With an attack, the model is attacked with the attack's
    own BN mode and then evaluated in eval mode.

    Args:
        model: Model taking the loader's (normalised) batches.
        loader: Yields ``(input, target)`` with class-index targets; ``input`` is a tensor, or a dict of
            tensors for models that take one (timm's NaFlex loader).
        attack: Optional attack applied to every batch.
        device: Device to move batches to.
        amp_autocast: Autocast context factory.
        max_samples: Stop after this many samples (per process).
        log_interval: Log progress every N batches (0: never).
        log_prefix: Label for progress lines.
        channels_last: Convert inputs to channels-last memory format.
        on_output: Called with every batch's ``(logits, target)`` after the forward pass, for extra
            scorers (ReaL labels, precision / recall).

    Returns:
        Dict with ``top1``, ``top5``, ``loss`` and ``samples``.

    Example:
        >>> evaluate_accuracy(model, loader, attack=PGDAttack(8 / 255, steps=20, mean=mean, std=std))
        {'top1': 47.1, 'top5': 88.0, 'loss': 1.93, 'samples': 1000}
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, count
    start = time.time()
    # attacked evaluations run for minutes to hours: a line every 30 s with the time left
    progress = ProgressLog(len(loader), log_prefix, logger=_logger) if attack is not None and _has_len(loader) else None
    for batch_idx, (input, target) in enumerate(loader):
        if isinstance(input, dict):  # NaFlex batches: patches, coordinates, validity (clean evaluation only)
            if attack is not None or channels_last:
                raise ValueError('patch-dict (NaFlex) batches take neither attacks nor channels-last.')
            input = {k: v.to(device) if torch.is_tensor(v) and device is not None else v for k, v in input.items()}
            target = target.to(device) if device is not None else target
        elif device is not None:
            input, target = input.to(device), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if max_samples is not None:
            remaining = max_samples - int(totals[3])
            if remaining <= 0:
                break
            input = ({k: v[:remaining] if torch.is_tensor(v) else v for k, v in input.items()}
                     if isinstance(input, dict) else input[:remaining])
            target = target[:remaining]
        if attack is not None:
            with amp_autocast():
                input = attack(model, input, target)
            model.eval()
        with torch.no_grad(), amp_autocast():
            logits = model(input)
        logits = logits.float()
        if on_output is not None:
            on_output(logits, target)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk == target.view(-1, 1)
        totals += torch.tensor([
            hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
            F.cross_entropy(logits, target, reduction='sum').item(), target.numel()], dtype=torch.float64)
        if log_interval and (batch_idx % log_interval == 0):
            _logger.info(f'{log_prefix}: [{batch_idx:>4d}/{len(loader)}] acc@1 {100 * totals[0] / totals[3]:.2f} '
                         f'({int(totals[3])} samples, {totals[3] / (time.time() - start):.1f} samples/s)')
        if progress is not None:
            progress.update(detail=f'acc@1 {100 * totals[0] / totals[3]:.2f}')
    if dist.is_available() and dist.is_initialized():
        reduced = totals.to(device if device is not None else 'cpu')
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    n = max(float(totals[3]), 1.0)
    return {
        'top1': float(100.0 * totals[0] / n),
        'top5': float(100.0 * totals[1] / n),
        'loss': float(totals[2] / n),
        'samples': int(totals[3]),
    }


def _has_len(loader) -> bool:
    try:
        len(loader)
    except TypeError:
        return False
    return True


def evaluate_folder(
        model: nn.Module,
        root: str,
        data_config: Mapping,
        class_map: Union[str, Mapping[str, int]] = '',
        num_samples: Optional[int] = None,
        batch_size: int = 64,
        workers: int = 0,
        device: Optional[torch.device] = None,
        log_prefix: str = 'Test',
        log_interval: int = 0,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
        transform: Optional[Callable] = None,
) -> Dict[str, float]:
    """Clean accuracy on an image folder (``<class>/<image>``) with the model's eval transform.

    Args:
        model: Model taking normalised input.
        root: The folder.
        data_config: timm data config (input size, interpolation, mean/std, crop).
        class_map: Class folder -> output index (default: sorted folder order).
        num_samples: Use only N evenly spaced images.
        batch_size: Batch size.
        workers: DataLoader workers.
        device: Device.
        log_prefix: Label for progress lines.
        log_interval: Log progress every N batches (0: never).
        amp_autocast: Autocast context factory.
        channels_last: Convert inputs to channels-last memory format.
        transform: Image -> normalised tensor, replacing the model's eval transform (e.g. ImageNet-C's
            reference centre crop).

    Example:
        >>> evaluate_folder(model, '/data/imagenet-c/fog/3', data_config, class_map=wnid_to_index)
    """
    dataset = create_dataset('', root=root, class_map=class_map or '')
    if num_samples is not None:
        dataset = spread_subset(dataset, num_samples)
    if transform is not None:
        dataset.transform = transform
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    else:
        loader = create_loader(
            dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
            interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
            crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=workers,
            use_prefetcher=False)
    return evaluate_accuracy(model, loader, device=device, log_prefix=log_prefix, log_interval=log_interval,
                             amp_autocast=amp_autocast, channels_last=channels_last)

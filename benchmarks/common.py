"""Shared by the benchmark scripts: the common flags, device-synchronised timers and the ideal cost of a step."""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Mapping, Tuple, TypeVar

import torch

__all__ = ['add_common_args', 'sync', 'timed', 'median_time', 'interleaved_median_times', 'ideal_time', 'task_update']

T = TypeVar('T')


def sync(device: torch.device) -> None:
    """Waits for queued CUDA work, so that a timer reads finished work."""
    if device.type == 'cuda':
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: torch.device) -> Tuple[T, float]:
    """``fn()``'s result and the wall seconds it took, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def median_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(steps))


def interleaved_median_times(fns: Dict[str, Callable[[], None]], steps: int, warmup: int,
                             device: torch.device) -> Dict[str, float]:
    """Median seconds of each function, timed in rounds (one call of each per round).

    On a shared machine the load drifts over minutes; interleaving makes every function see the same
    load, so the ratios between them hold even when the absolute times do not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[1])
    return {name: statistics.median(t) for name, t in times.items()}


def task_update(task: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One training update of a timm-adv task on ``(x, y)``, as train.py makes it: loss, backward, step; its outputs.

    Example:
        >>> seconds = median_time(lambda: task_update(task, optimizer, x, y), steps=10, warmup=2, device=device)
    """
    out = task(x, y)
    out['loss'].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def ideal_time(cost: Mapping[str, float], unit_seconds: Mapping[str, float]) -> float:
    """Seconds of a step doing only its unavoidable work: a task's ``ideal_cost()`` counts, each times the
    measured seconds of one such unit (``train_steps``: a plain training step, ``attack_passes``: a forward +
    input-only backward, ``vqgan_passes``: one VQGAN reconstruction...).

    Example:
        >>> ideal_time(task.ideal_cost(), {'train_steps': t_plain, 'attack_passes': t_attack})
    """
    unmeasured = sorted(set(cost) - set(unit_seconds))
    if unmeasured:
        raise ValueError(f'no measured unit time for {", ".join(unmeasured)} of the cost {dict(cost)}; time one of '
                         f'each.')
    return sum(n * unit_seconds[unit] for unit, n in cost.items())


def add_common_args(parser: argparse.ArgumentParser, what: str = 'method') -> None:
    """Model, input, batch, timing and device flags, the same in every cost benchmark."""
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--steps', type=int, default=7, help=f'timed steps per {what} (median reported)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')

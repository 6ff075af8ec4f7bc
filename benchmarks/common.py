"""Shared by the benchmark scripts: the common flags and the median wall time of a step, device-synchronised."""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ['add_common_args', 'sync', 'median_time', 'interleaved_median_times']


def sync(device: torch.device) -> None:
    """Waits for queued CUDA work, so that a timer reads finished work."""
    if device.type == 'cuda':
        torch.cuda.synchronize()


def median_time(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def add_common_args(parser: argparse.ArgumentParser, what: str = 'method') -> None:
    """Model, input, batch, timing and device flags, the same in every cost benchmark."""
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--steps', type=int, default=7, help=f'timed steps per {what} (median reported)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')

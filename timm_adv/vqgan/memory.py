"""Memory of VQGAN passes: an estimate per image, the chunk that fits a budget, and a peak measurement.

taming's ``Encoder`` keeps the output of every block until its last layer, and its ``Decoder`` runs
its widest blocks at full resolution, so without gradients a pass still holds hundreds of megabytes
per 224 px image. :func:`vqgan_activation_bytes` counts those tensors from the config;
:func:`peak_memory_bytes` measures a pass (CUDA: the allocator's peak; CPU: allocations replayed from
torch's profiler), which ``benchmarks/vqgan_cost.py --memory`` prints side by side.

    >>> est = vqgan_activation_bytes(load_vqgan_config('vq-f8'), 224, 224)
    >>> chunk_for_budget(est, 8 * 2 ** 30)          # images per pass within 8 GiB
"""
from typing import Callable, Dict, Optional

import torch

from .config import VQGANConfig

__all__ = ['vqgan_activation_bytes', 'chunk_for_budget', 'default_memory_budget', 'peak_memory_bytes']


def vqgan_activation_bytes(config: VQGANConfig, height: int, width: int, element_size: int = 4) -> Dict[str, int]:
    """Estimated peak activation bytes per image of an encode and of a decode, without gradients.

    Encoder: every block output it keeps, plus the widest block's working set (its input, GroupNorm
    output, and SiLU's ``x * sigmoid(x)`` temporaries). Decoder: the widest block's working set; at
    full resolution its first block still has the previous level's channels.

    Args:
        config: The VQGAN architecture.
        height: Image height in pixels.
        width: Image width in pixels.
        element_size: Bytes per activation element (4: fp32, 2: bf16).

    Returns:
        ``{'encode': bytes, 'decode': bytes}`` per image.
    """
    dd = config.ddconfig
    widths = [dd['ch'] * m for m in dd['ch_mult']]
    pixels = [(height >> i) * (width >> i) for i in range(len(widths))]
    kept = dd['ch'] * pixels[0]  # conv_in
    working = 0
    block_in = dd['ch']
    for level, (c, p) in enumerate(zip(widths, pixels)):
        kept += dd['num_res_blocks'] * c * p
        if level + 1 < len(widths):
            kept += c * pixels[level + 1]  # downsample output
        working = max(working, 3 * max(block_in, c) * p)
        block_in = c
    decode = 0
    block_in = widths[-1]
    for level in reversed(range(len(widths))):
        c, p = widths[level], pixels[level]
        decode = max(decode, (4 * block_in + c) * p)
        block_in = c
    return {'encode': (kept + working) * element_size, 'decode': decode * element_size}


def chunk_for_budget(per_image: Dict[str, int], budget_bytes: float) -> int:
    """Images per encoder / decoder pass whose estimated activations fit ``budget_bytes`` (at least 1)."""
    return max(1, int(budget_bytes // max(per_image.values())))


def default_memory_budget(device: torch.device) -> Optional[float]:
    """The VQGAN's share of the device when none is given: a quarter of a GPU (the model trains alongside);
    None on CPU, where host memory is large and chunking only slows the passes."""
    if device.type != 'cuda':
        return None
    return torch.cuda.get_device_properties(device).total_memory / 4


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: every allocation and free recorded by torch's
    profiler, replayed in order (transients inside a single kernel are not seen).
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak

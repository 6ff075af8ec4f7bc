"""Cost of one AdvProp training step relative to a plain step, measured in one process.

Times (median of ``--steps`` rounds, the variants interleaved so that load on a shared machine
hits them alike):

* ``plain``: forward, backward and optimiser step of the plain model on a batch of B.
* ``advprop``: the AdvProp step (attack through the auxiliary BNs, one forward/backward of the
  2B clean + adversarial batch in split mode, optimiser step).
* ``ideal``: what AdvProp cannot avoid (``AdvPropTask.ideal_cost()``): the same attack on the plain model
  plus a plain step on a batch of 2B. ``advprop / ideal`` is the overhead of the dual-BN routing.

Peak memory is reported only on CUDA (``torch.cuda.max_memory_allocated``); on CPU only time is
measured.

Example:
    python benchmarks/advprop_cost.py --model resnet10t --batch-size 64 --img-size 32 --eps 1/255
"""
import argparse
import copy
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn as nn
import timm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from timm_adv.attacks import create_attack, parse_eps  # noqa: E402
from timm_adv.tasks import AdvPropTask, StandardTask  # noqa: E402
from timm_adv.tasks.advprop import advprop_steps  # noqa: E402
from common import add_common_args, ideal_time, interleaved_median_times, task_update  # noqa: E402  (benchmarks/common.py)


def _train_step(task: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x, y):
        task_update(task, optimizer, x, y)
    return step


def _cuda_peak(fn: Callable[[], None], device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (the model and batch included)."""
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device)


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, 'variant')
    parser.add_argument('--eps', default='1/255', help='attack eps; steps follow the paper (eps*255 + 1, 1 at 1/255)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    plain_model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    dual_model = AdvPropTask.prepare_model(copy.deepcopy(plain_model)).to(device)
    eps = parse_eps(args.eps, '--eps')
    attack = create_attack(eps, steps=advprop_steps(eps), step_size='1/255', targeted='random', bn_mode='eval')
    criterion = nn.CrossEntropyLoss()
    plain_task = StandardTask(plain_model, criterion, verbose=False)
    advprop_task = AdvPropTask(dual_model, criterion, attack, verbose=False)
    plain_step = _train_step(plain_task, torch.optim.SGD(plain_model.parameters(), lr=1e-3))
    advprop_step = _train_step(advprop_task, torch.optim.SGD(dual_model.parameters(), lr=1e-3))
    plain_task.train()
    advprop_task.train()

    b = args.batch_size
    x = torch.randn(2 * b, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (2 * b,), device=device)
    variants = {
        'plain': lambda: plain_step(x[:b], y[:b]),
        'advprop': lambda: advprop_step(x[:b], y[:b]),
        'attack': lambda: attack(plain_model, x[:b], y[:b]),
        'plain_2x': lambda: plain_step(x, y),
    }
    t = interleaved_median_times(variants, args.steps, args.warmup, device)
    # the task's own count (2 training steps, the attack's passes) in the units timed here
    ideal = ideal_time(advprop_task.ideal_cost(), {'train_steps': t['plain_2x'] / 2,
                                                   'attack_passes': t['attack'] / (attack.steps * attack.restarts)})
    result = {
        'advprop_over_plain': t['advprop'] / t['plain'],
        'ideal_over_plain': ideal / t['plain'],
        'advprop_over_ideal': t['advprop'] / ideal,
    }
    print(f'{args.model} batch {b} img {args.img_size} on {device}, {attack!r}, median of {args.steps}')
    for k, v in t.items():
        print(f'  {k:>9s}: {v * 1000:8.1f} ms')
    print(f'  AdvProp step / plain step: {result["advprop_over_plain"]:.2f}x '
          f'(ideal: attack + 2x batch = {result["ideal_over_plain"]:.2f}x; '
          f'AdvProp / ideal = {result["advprop_over_ideal"]:.2f})')
    if device.type == 'cuda':
        mem = {k: _cuda_peak(fn, device) for k, fn in variants.items()}
        result['mem_advprop_over_plain'] = mem['advprop'] / mem['plain']
        print(f'  peak memory AdvProp / plain: {result["mem_advprop_over_plain"]:.2f}x '
              f'(plain 2x batch: {mem["plain_2x"] / mem["plain"]:.2f}x)')
    else:
        print('  peak memory: not measured on CPU')
    return result


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Compiled (``--torchcompile``) vs eager training-step cost of PGD-AT, with compile time and recompile count.

Every variant trains its own copy of the same model on the same batch; after warm-up the steps are
interleaved round-robin (the load of a shared machine hits all alike) and the median step time is
reported relative to an eager plain (``none``) step. Also printed:

* the compile time: the wall time of the compiled PGD task's warm-up steps minus as many eager PGD steps;
* the graphs dynamo compiled during warm-up and during the timed steps (the latter must be 0: no
  recompiles per step);
* the cost of one attack pass (forward + input gradient), eager and compiled, with the parameters frozen
  (the attack core's way) or requiring grad: a compiled backward then computes the weight gradients too.

    python benchmarks/compile_cost.py --model resnet10t --img-size 32 --batch-size 64 --backend inductor
"""
import argparse
import copy
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_common_args, interleaved_median_times, task_update, timed  # noqa: E402  (benchmarks/common.py, beside this script)
from timm_adv.attacks import attack_bn_mode, frozen_parameters, input_gradient  # noqa: E402
from timm_adv.tasks import add_adv_args, create_task  # noqa: E402
from timm_adv.utils import check_compile_args, compiled_graphs  # noqa: E402

MEAN = STD = (0.5, 0.5, 0.5)


def _task(method, model, args_list, device):
    parser = argparse.ArgumentParser()
    add_adv_args(parser)
    task = create_task(model, nn.CrossEntropyLoss(), parser.parse_args(['--adv-method', method, *args_list]),
                       mean=MEAN, std=STD, device=device).to(device)
    task.train()
    return task


def _stepper(task, x, y):
    optimizer = torch.optim.SGD(task.unwrapped_model.parameters(), lr=0.01, momentum=0.9)

    def step():
        task_update(task, optimizer, x, y)
    return step


def _attack_pass(model, x_pix, y, task, freeze):
    attack = task.attack

    def run():
        with attack_bn_mode(model, attack.bn_mode), torch.enable_grad():
            if freeze:
                with frozen_parameters(model):
                    input_gradient(model, x_pix, torch.zeros_like(x_pix), y, attack.normalizer)
            else:
                input_gradient(model, x_pix, torch.zeros_like(x_pix), y, attack.normalizer)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser)
    parser.add_argument('--backend', default='inductor', help='torch.compile backend (default: inductor)')
    parser.add_argument('--mode', default=None, help='torch.compile mode (default: None)')
    parser.add_argument('--adv-steps', type=int, default=10, help='PGD steps (default: 10)')
    parser.add_argument('--adv-eps', default='8/255')
    args = parser.parse_args(argv)
    check_compile_args(args.backend, args.mode)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    pgd_flags = ['--adv-eps', args.adv_eps, '--adv-steps', str(args.adv_steps)]

    plain_eager = _task('none', copy.deepcopy(base), [], device)
    plain_compiled = _task('none', copy.deepcopy(base), [], device)
    pgd_eager = _task('pgd', copy.deepcopy(base), pgd_flags, device)
    pgd_compiled = _task('pgd', copy.deepcopy(base), pgd_flags, device)
    steps = {name: _stepper(t, x, y) for name, t in (
        ('plain eager', plain_eager), ('plain compiled', plain_compiled), ('PGD eager', pgd_eager),
        ('PGD compiled', pgd_compiled))}

    # compile time: the compiled task's warm-up against as many eager steps
    for task in (pgd_compiled, plain_compiled):
        task.compile(backend=args.backend, mode=args.mode)
    warm = max(args.warmup, 2)  # the attack and training graphs compile in the first step
    eager_seconds = sum(timed(steps['PGD eager'], device)[1] for _ in range(warm))
    graphs_before = compiled_graphs()
    compile_seconds = sum(timed(steps['PGD compiled'], device)[1] for _ in range(warm)) - eager_seconds
    pgd_graphs = compiled_graphs() - graphs_before
    for _ in range(warm):
        steps['plain compiled']()

    model = pgd_compiled.attack_model
    x_pix = pgd_compiled.attack.normalizer.to_pixel(x)
    eager_model = pgd_eager.unwrapped_model
    fns = dict(steps)
    fns['attack pass eager, params require grad'] = _attack_pass(eager_model, x_pix, y, pgd_eager, freeze=False)
    fns['attack pass eager, params frozen'] = _attack_pass(eager_model, x_pix, y, pgd_eager, freeze=True)
    fns['attack pass compiled, params frozen'] = _attack_pass(model, x_pix, y, pgd_compiled, freeze=True)
    fns['attack pass compiled, params require grad'] = _attack_pass(model, x_pix, y, pgd_compiled, freeze=False)
    fns['attack pass compiled, params require grad']()  # its own graph (weight gradients in the backward)
    warm_graphs = compiled_graphs()
    times = interleaved_median_times(fns, args.steps, args.warmup, device)
    recompiles = compiled_graphs() - warm_graphs

    plain = times['plain eager']
    print(f'{args.model} {args.img_size}px batch {args.batch_size} on {device.type}, backend {args.backend}, '
          f'mode {args.mode}, PGD-{args.adv_steps} eps {args.adv_eps}, median of {args.steps} interleaved rounds')
    print(f'compile time of the PGD task (warm-up {warm} steps minus {warm} eager steps): {compile_seconds:.1f} s '
          f'= {compile_seconds / times["PGD eager"]:.1f} eager PGD steps; graphs compiled: {pgd_graphs}')
    print(f'graphs compiled during the {args.steps} timed rounds (recompiles): {recompiles}')
    print('| step | time / plain eager step |')
    print('|---|---|')
    for name, t in times.items():
        print(f'| {name} | {t / plain:.2f} |')
    print(f'PGD compiled / PGD eager: {times["PGD compiled"] / times["PGD eager"]:.2f}; '
          f'plain compiled / plain eager: {times["plain compiled"] / plain:.2f}; attack pass eager frozen / '
          f'eager requiring grad: {times["attack pass eager, params frozen"] / times["attack pass eager, params require grad"]:.2f}; '
          f'compiled frozen / eager frozen: '
          f'{times["attack pass compiled, params frozen"] / times["attack pass eager, params frozen"]:.2f}; '
          f'compiled frozen / compiled requiring grad: '
          f'{times["attack pass compiled, params frozen"] / times["attack pass compiled, params require grad"]:.2f}')


if __name__ == '__main__':
    main()

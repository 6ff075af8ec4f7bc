#!/usr/bin/env python3
"""Training-step cost of fast adversarial training (FGSM-SDI, FGSM-RS) next to PGD-10 AT.

Every method trains its own copy of the same model on the same batch; steps are interleaved
round-robin (so load on a shared machine hits all methods alike) and the median step time is
reported relative to a plain (``none``) step, beside each method's ideal count of
forward-backward passes:

* FGSM-RS: 2 (one attack pass, one training pass);
* FGSM-SDI: 3 + 2/k (input gradient, FGSM step, training pass, plus a generator update of about
  two passes every k batches); generator batches are timed separately and amortised;
* PGD-10: 11.

Attack passes skip weight gradients, so a measured ratio somewhat below the ideal is expected; the
generator's own compute is not in the ideal count (it runs at full resolution with 64 channels, so
next to a small model or a strided stem it is not negligible). The script prints both parts: the
cost of one attack pass, measured as (PGD-10 - plain) / 10, and of one generator forward.

    python benchmarks/fast_at_cost.py --model resnet10t --batch-size 64 --img-size 32 --steps 7
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timm_adv.tasks import add_adv_args, create_task  # noqa: E402
from common import add_common_args, interleaved_median_times, task_update  # noqa: E402  (benchmarks/common.py, beside this script)


def _task(method, flags, model_name, num_classes, eps, seed, device, mean, std):
    parser = argparse.ArgumentParser()
    add_adv_args(parser)
    args = parser.parse_args(['--adv-method', method, '--adv-eps', str(eps), *flags])
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=num_classes).to(device)
    task = create_task(model, nn.CrossEntropyLoss(), args, mean=mean, std=std, device=device).to(device)
    task.train()
    return task, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _step(name, task, optimizer, x, y):
    def step():
        if name.startswith('fgsm-sdi'):
            # choose whether this batch updates the generator (it does when batches_seen % k == 0)
            task.batches_seen = 0 if name.endswith('generator batch') else 1
        task_update(task, optimizer, x, y)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(parser)
    parser.add_argument('--eps', default='8/255')
    parser.add_argument('--sdi-every', type=int, default=20, help='FGSM-SDI generator update interval k')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    k = args.sdi_every

    # name -> (method, flags, ideal passes per batch)
    methods = {
        'plain': ('none', [], 1.0),
        'fgsm-rs': ('fgsm-rs', [], 2.0),
        'fgsm-sdi regular batch': ('fgsm-sdi', ['--adv-sdi-every', str(k)], 3.0),
        'fgsm-sdi generator batch': ('fgsm-sdi', ['--adv-sdi-every', str(k)], 5.0),
        'pgd-10': ('pgd', ['--adv-steps', '10'], 11.0),
    }
    tasks = {name: _task(m, flags, args.model, args.num_classes, args.eps, 0, device, mean, std)
             for name, (m, flags, _) in methods.items()}
    g = torch.Generator().manual_seed(0)
    x = ((torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g) - 0.5) / 0.5).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)

    sdi = tasks['fgsm-sdi regular batch'][0]
    grad_sign = torch.randn_like(x).sign()

    def generator_forward():
        with torch.no_grad():
            sdi.generator.eval()
            sdi.generator(x, grad_sign)

    fns = {name: _step(name, task, optimizer, x, y) for name, (task, optimizer) in tasks.items()}
    fns['generator forward'] = generator_forward
    med = interleaved_median_times(fns, args.steps, args.warmup, device)
    med[f'fgsm-sdi amortised (k={k})'] = ((k - 1) * med['fgsm-sdi regular batch'] + med['fgsm-sdi generator batch']) / k
    ideal = {name: p for name, (_, _, p) in methods.items()}
    ideal[f'fgsm-sdi amortised (k={k})'] = 3.0 + 2.0 / k
    plain = med['plain']
    print(f'{args.model}, batch {args.batch_size}, {args.img_size}px, {device.type}, threads {torch.get_num_threads()}, '
          f'eps {args.eps}, median of {args.steps} steps (interleaved)')
    print(f'{"method":32s} {"step ms":>9s} {"x plain":>8s} {"ideal":>6s} {"measured/ideal":>15s}')
    order = ['plain', 'fgsm-rs', 'fgsm-sdi regular batch', 'fgsm-sdi generator batch', f'fgsm-sdi amortised (k={k})',
             'pgd-10']
    for name in order:
        ratio = med[name] / plain
        print(f'{name:32s} {1e3 * med[name]:9.1f} {ratio:8.2f} {ideal[name]:6.2f} {ratio / ideal[name]:15.2f}')
    with torch.no_grad(), FlopCounterMode(display=False) as model_flops:
        sdi.unwrapped_model(x)
    with torch.no_grad(), FlopCounterMode(display=False) as gen_flops:
        sdi.generator(x, grad_sign)
    print(f'forward FLOPs per image: model {model_flops.get_total_flops() / args.batch_size / 1e6:.1f} M, '
          f'generator {gen_flops.get_total_flops() / args.batch_size / 1e6:.1f} M')
    attack_pass = (med['pgd-10'] - plain) / 10 / plain
    gen = med['generator forward'] / plain
    print(f'one attack pass (forward + input-gradient backward) = {attack_pass:.2f} plain steps [(pgd-10 - plain) / 10]')
    print(f'one generator forward = {gen:.2f} plain steps')
    print(f'fgsm-rs regular batch from these parts: 1 + a = {1 + attack_pass:.2f} (measured '
          f'{med["fgsm-rs"] / plain:.2f}); fgsm-sdi: 1 + 2a + generator = {1 + 2 * attack_pass + gen:.2f} '
          f'(measured {med["fgsm-sdi regular batch"] / plain:.2f})')


if __name__ == '__main__':
    main()

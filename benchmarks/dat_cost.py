#!/usr/bin/env python3
"""Cost of a DAT training step, ours against the official cost structure, measured in one process.

Variants, timed in interleaved rounds (median of ``--repeats``) so that load on a shared machine hits
them alike:

* ``plain``: forward, backward and optimiser step of the model on one batch.
* ``attack pass``: one forward + input-only backward (what one attack step costs at least).
* ``VQGAN pass``: one ``reconstruct`` (encode, quantise, decode): eager fp32 (the official code) and
  at our settings.
* ``ours``: a ``--adv-method dat`` step (``DATTask``): VQGAN with ``--bf16`` / ``--channels-last`` /
  ``--compile`` as given (the task's ``--adv-dat-vqgan-*`` flags), the attack through ``timm_adv.attacks`` (input gradients only), codes of the first
  reconstruction reused, unchanged samples not decoded twice.
* ``reference``: the official EasyRobust loop's cost structure on the same model and VQGAN weights:
  eager fp32 VQGAN, the attack's backward filling parameter gradients, the attack's extra final
  forward, then the two training forwards and one backward.

Each step is split into VQGAN / attack / training time. For ``ours``, the augmentation alone
(VQGAN + attack) and the attack alone are timed as separate variants and subtracted; for
``reference`` its sections are timed inline. ``ideal`` is ``DATTask.ideal_cost()`` (2 plain steps + 1 attack
pass + 2 VQGAN passes) in the times measured here, VQGAN passes at our settings.

Images per second of each step are printed too, and with ``--memory`` the peak memory of one ``ours``
and one ``reference`` step (CUDA: ``max_memory_allocated``; CPU: torch's profiler, slow at 224 px).

    python benchmarks/dat_cost.py --vqgan output/vqgan/bundled_mnist --real-images --model resnet10t --batch-size 64
    python benchmarks/dat_cost.py --vqgan vq-f8 --random-vqgan --img-size 224 --model resnet50 --batch-size 32 --bf16
"""
import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ParseKwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from timm_adv.attacks import PixelNormalizer, create_attack, input_gradient  # noqa: E402
from timm_adv.augment import DiscreteAdversarialAugment, compile_vqgan  # noqa: E402
from timm_adv.data import BundledMnist  # noqa: E402
from timm_adv.tasks import DATTask, StandardTask  # noqa: E402
from timm_adv.utils import checkpoint_state_dict, read_checkpoint  # noqa: E402
from timm_adv.vqgan import create_vqgan, peak_memory_bytes  # noqa: E402
from common import ideal_time, interleaved_median_times, task_update, timed  # noqa: E402  (benchmarks/common.py, beside this script)


class _Sections:
    """Accumulates synchronised wall time per named section of one call."""

    def __init__(self, device):
        self.device, self.times = device, {}

    def run(self, name: str, fn: Callable):
        out, seconds = timed(fn, self.device)
        self.times[name] = self.times.get(name, 0.0) + seconds
        return out


def reference_step(model, vqgan, optimizer, x, y, normalizer, eps, step_size, start_prob, sections):
    """One step with the official cost structure (EasyRobust ``dat/main.py`` + ``pgd_generator``).

    The attack here only reproduces the official cost (the maths equals ours): train-mode forwards
    that update BN statistics, ``loss.backward()`` filling parameter gradients, an extra forward
    after the last step, eager fp32 VQGAN passes.
    """
    criterion = nn.CrossEntropyLoss()
    x_pix = normalizer.to_pixel(x).clamp(0, 1)
    output = sections.run('training', lambda: model(x))
    loss = criterion(output, y)

    with torch.no_grad():
        x_rec = sections.run('vqgan', lambda: vqgan.reconstruct(x_pix))

    def attack():
        adv = x_rec.clone()
        if torch.rand(()) < start_prob:
            noise = torch.randn_like(adv)
            adv = (adv + eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
        adv = adv.detach().requires_grad_(True)
        F.cross_entropy(model(normalizer.from_pixel(adv)), y).backward()  # fills parameter .grad too
        grad = adv.grad
        with torch.no_grad():
            adv = adv + step_size * grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
            diff = (adv - x_rec).renorm(p=2, dim=0, maxnorm=eps)
            adv = (x_rec + diff).clamp(0, 1)
        F.cross_entropy(model(normalizer.from_pixel(adv)), y)  # the official final forward (use_best=False)
        return adv

    x_adv = sections.run('attack', attack)
    with torch.no_grad():
        x_dat = sections.run('vqgan', lambda: vqgan.reconstruct(x_adv))

    def train_rest():
        total = loss + criterion(model(normalizer.from_pixel(x_dat)), y)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()

    sections.run('training', train_rest)


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--vqgan', required=True, help='preset, folder, file, local-dir: or hf-hub: name')
    parser.add_argument('--random-vqgan', action='store_true', help='preset architecture with random weights')
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='timm.create_model keyword arguments, e.g. img_size=32 for a ViT below 224 px')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--real-images', action='store_true',
                        help='a batch of bundled/mnist digits (what a VQGAN fitted on them sees) instead of noise; the '
                             'share of samples whose codes the attack changes depends on the images')
    parser.add_argument('--checkpoint', default=None, help='train.py checkpoint of the model (a trained model)')
    parser.add_argument('--bf16', action='store_true', help='ours: VQGAN under bf16 autocast')
    parser.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                        help='ours: VQGAN in channels_last (default: as --adv-dat-vqgan-channels-last, on for CPU, '
                             'off for CUDA)')
    parser.add_argument('--compile', action='store_true', help='ours: torch.compile the VQGAN encoder / decoder')
    parser.add_argument('--chunk', type=int, default=None, help='ours: images per VQGAN pass (default: whole batch)')
    parser.add_argument('--memory', action='store_true', help='peak memory of one ours and one reference step')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == 'cpu'

    def vqgan(bf16=False, channels_last=False):
        torch.manual_seed(0)  # the same random weights for every copy with --random-vqgan
        return create_vqgan(args.vqgan, device, bf16=bf16, channels_last=channels_last,
                            **({'pretrained': False} if args.random_vqgan else {}))

    vq_ours, vq_ref = vqgan(args.bf16, args.channels_last), vqgan()
    vq_ours.chunk_size = args.chunk
    if args.compile:
        compile_vqgan(vq_ours)
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    if args.checkpoint:
        model.load_state_dict(checkpoint_state_dict(read_checkpoint(args.checkpoint, '--checkpoint')))
    model.to(device)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    normalizer = PixelNormalizer(mean, std)
    models = {k: copy.deepcopy(model) for k in ('plain', 'ours', 'reference')}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    attack = create_attack(0.1, steps=1, step_size=0.1, norm='l2', bn_mode='train', start_prob=0.8,
                           start_on_sphere=True, mean=mean, std=std)
    augment = DiscreteAdversarialAugment(vq_ours, attack)
    tasks = {'plain': StandardTask(models['plain'], nn.CrossEntropyLoss(), verbose=False),
             'ours': DATTask(models['ours'], nn.CrossEntropyLoss(), augment, verbose=False)}
    for task in tasks.values():
        task.train()
    models['reference'].train()

    torch.manual_seed(1)
    if args.real_images:
        ds = BundledMnist('validation')
        index = torch.linspace(0, len(ds) - 1, args.batch_size).long().numpy()
        digits = torch.from_numpy(ds.images[index]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        x_pix = F.interpolate(digits, size=args.img_size, mode='bilinear').clamp(0, 1).to(device)
    else:
        x_pix = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = normalizer.from_pixel(x_pix)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    x_rec = vq_ours.reconstruct(x_pix)
    changed: List[float] = []

    def step(name):
        def run():
            out = task_update(tasks[name], optimizers[name], x, y)
            if name == 'ours':
                changed.append(float(out['dat_samples_changed']))
        return run

    ref_sections = _Sections(device)
    variants = {
        'plain step': step('plain'),
        'attack pass': lambda: input_gradient(models['ours'], x_rec, torch.zeros_like(x_rec), y, normalizer),
        'VQGAN pass fp32': lambda: vq_ref.reconstruct(x_pix),
        'VQGAN pass ours': lambda: vq_ours.reconstruct(x_pix),
        'ours: augmentation': lambda: augment(models['ours'], x, y),
        'ours: attack': lambda: attack.perturb(models['ours'], x_rec, y),
        'ours step': step('ours'),
        'reference step': lambda: reference_step(models['reference'], vq_ref, optimizers['reference'], x, y,
                                                 normalizer, 0.1, 0.1, 0.8, ref_sections),
    }
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    ref_sections.times.clear()  # the reference's section times count the timed rounds only
    t = interleaved_median_times(variants, args.repeats, 0, device)
    ref_split = {k: v / args.repeats for k, v in ref_sections.times.items()}
    plain = t['plain step']
    ours_split = {'vqgan': t['ours: augmentation'] - t['ours: attack'], 'attack': t['ours: attack'],
                  'training': t['ours step'] - t['ours: augmentation']}
    cost = tasks['ours'].ideal_cost()  # 2 training steps, 1 attack pass, 2 VQGAN passes
    units = {'train_steps': plain, 'attack_passes': t['attack pass'], 'vqgan_passes': t['VQGAN pass ours']}
    ideal = ideal_time(cost, units)

    print(f'{args.model} batch {args.batch_size} img {args.img_size} on {device}, torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads; VQGAN {args.vqgan}{" (random weights)" if args.random_vqgan else ""} '
          f'f={vq_ours.downsample_factor}; ours: bf16={args.bf16} channels_last={args.channels_last} '
          f'compile={args.compile} chunk={args.chunk}; {"bundled digits" if args.real_images else "uniform noise"}, '
          f'{"model " + args.checkpoint if args.checkpoint else "untrained model"}; '
          f'median of {args.repeats} interleaved rounds')
    print('| variant | ms | / plain step |')
    print('|---|---|---|')
    for k, v in t.items():
        print(f'| {k} | {v * 1e3:.1f} | {v / plain:.2f} |')
    print()
    print('| DAT step | total / plain | VQGAN / plain | attack / plain | training / plain |')
    print('|---|---|---|---|---|')
    for name, total, split in (('ours', t['ours step'], ours_split),
                               ('reference', t['reference step'], ref_split)):
        print(f'| {name} | {total / plain:.2f} | {split.get("vqgan", 0) / plain:.2f} | '
              f'{split.get("attack", 0) / plain:.2f} | {split.get("training", 0) / plain:.2f} |')
    print(f'| ideal ({cost["train_steps"]:g} plain + {cost["attack_passes"]:g} attack pass + {cost["vqgan_passes"]:g} '
          f'VQGAN passes ours) | {ideal / plain:.2f} | {cost["vqgan_passes"] * units["vqgan_passes"] / plain:.2f} | '
          f'{cost["attack_passes"] * units["attack_passes"] / plain:.2f} | {cost["train_steps"]:.2f} |')
    print('\n| step | images / s |')
    print('|---|---|')
    for name in ('plain step', 'ours step', 'reference step'):
        print(f'| {name} | {args.batch_size / t[name]:.1f} |')
    if args.memory:
        peaks = {'ours': peak_memory_bytes(step('ours'), device),
                 'reference': peak_memory_bytes(lambda: reference_step(
                     models['reference'], vq_ref, optimizers['reference'], x, y, normalizer, 0.1, 0.1, 0.8,
                     _Sections(device)), device)}
        print('| peak memory of one step (GiB) | ' + ' | '.join(f'{k} {v / 2 ** 30:.2f}' for k, v in peaks.items())
              + ' |')
    result = {
        'ours_over_plain': t['ours step'] / plain, 'reference_over_plain': t['reference step'] / plain,
        'ours_over_ideal': t['ours step'] / ideal, 'reference_over_ours': t['reference step'] / t['ours step'],
        'samples_decoded_twice': statistics.mean(changed) if changed else float('nan'),
    }
    print(f'\nours / ideal = {result["ours_over_ideal"]:.2f}; reference / ours = {result["reference_over_ours"]:.2f}x; '
          f'samples whose codes the attack changed (decoded twice): {100 * result["samples_decoded_twice"]:.0f}%')
    return result


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""AdvBN training step cost relative to a plain step of the same model, next to its ideal, in one process.

Measured in this one run, each the median of ``--steps`` timed calls after warm-up, the modes
interleaved (one call of each per round) so that a shared machine's drifting load hits all alike:

* ``plain``: a plain timm training step (forward, backward, SGD step) of the unmodified model;
* ``advbn (ours)``: one ``--adv-method advbn`` step (front once, K attack passes over the back,
  one training pass of the back on the clean + adversarial batch);
* ``ideal``: the sum of its unavoidable parts, each timed on its own: one front pass without
  gradients + K back passes with gradients for a, b only + one back training pass (forward and
  backward with weight gradients on the 2N batch, SGD step). The attack pass is the marginal cost of
  one step, ``(t(K steps) - t(1 step)) / (K - 1)`` of one attack call, so the call's set-up (BN mode
  switch, multipliers, routing) is not counted K times;
* ``front recomputed + anomaly``: the front runs again for every attack step, with autograd anomaly
  detection on;
* ``official code``: the structure of ``azshue/AdvBN``'s ``train_imagenet.py``: front once per
  batch, anomaly detection on, clean and adversarial back passes run separately;
* ``official structure, no anomaly detection``: the same without anomaly detection. Its difference to
  ``official code`` is the cost of anomaly detection; its difference to ``ours`` is the structural
  cost of two back training passes (N each) against our one concatenated pass (2N).

    python benchmarks/advbn_cost.py --model resnet10t --img-size 32 --batch-size 64
"""
import argparse
import os
import sys
import warnings
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_adv.attacks import FeatureStatsAttack, perturb_feature_stats  # noqa: E402
from timm_adv.layers import dual_bn_route, get_advbn  # noqa: E402
from timm_adv.tasks import AdvBNTask  # noqa: E402
from common import add_common_args, interleaved_median_times  # noqa: E402  (benchmarks/common.py, beside this script)


def _sgd_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'mode')
    parser.add_argument('--stage', default=None, help='cut stage (default: the first stride-4 stage)')
    parser.add_argument('--attack-steps', type=int, default=6, help='AdvBN ascent steps K (default: 6)')
    args = parser.parse_args()
    warnings.filterwarnings('ignore', message='Anomaly Detection has been enabled')
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    n = args.batch_size

    plain = timm.create_model(args.model, num_classes=args.num_classes).to(device).train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    train_args = argparse.Namespace(model=args.model, adv_advbn_stage=args.stage, pretrained=True,
                                    img_size=args.img_size, input_size=None)
    model = AdvBNTask.prepare_model(timm.create_model(args.model, num_classes=args.num_classes), train_args)
    model.to(device)
    advbn = get_advbn(model)
    attack = FeatureStatsAttack(steps=args.attack_steps, relu=advbn.relu)
    task = AdvBNTask(model, nn.CrossEntropyLoss(), attack, verbose=False).to(device)
    task.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    dual = task.dual_bn

    # the ideal's parts, each on its own
    with torch.no_grad():
        feature = advbn.front(model, x)
    one_step = FeatureStatsAttack(steps=1, relu=advbn.relu)

    def attack_call(att):
        def run():
            with dual_bn_route(model, 'aux') if dual else nullcontext():
                att.perturb(model, lambda f: advbn.back(model, f), feature, y)
        return run

    features = torch.cat([feature, perturb_feature_stats(feature, 0.5 * torch.ones_like(feature[:1, :, :1, :1]),
                                                         torch.ones_like(feature[:1, :, :1, :1]), relu=advbn.relu)])

    def back_train():
        with dual_bn_route(model, 'split', split_size=n) if dual else nullcontext():
            out = advbn.back(model, features)
        _sgd_step(F.cross_entropy(out[:n], y) + F.cross_entropy(out[n:], y), optimizer)


    def recompute_front_step():
        def back_from_scratch(f):
            with torch.no_grad():
                advbn.front(model, x)
            return advbn.back(model, f)
        with torch.autograd.detect_anomaly(check_nan=True):
            with torch.no_grad():
                f = advbn.front(model, x)
            with dual_bn_route(model, 'aux') if dual else nullcontext():
                a, b = attack.perturb(model, back_from_scratch, f, y)
            both = torch.cat([f, perturb_feature_stats(f, a, b, relu=advbn.relu)])
            with dual_bn_route(model, 'split', split_size=n) if dual else nullcontext():
                out = advbn.back(model, both)
            _sgd_step(F.cross_entropy(out[:n], y) + F.cross_entropy(out[n:], y), optimizer)

    def official_step(anomaly: bool = True):
        with torch.autograd.detect_anomaly(check_nan=True) if anomaly else nullcontext():
            with torch.no_grad():
                f = advbn.front(model, x)
            with dual_bn_route(model, 'aux') if dual else nullcontext():
                a, b = attack.perturb(model, lambda feat: advbn.back(model, feat), f, y)
                loss_adv = F.cross_entropy(advbn.back(model, perturb_feature_stats(f, a, b, relu=advbn.relu)), y)
            with dual_bn_route(model, 'main') if dual else nullcontext():
                loss_clean = F.cross_entropy(advbn.back(model, f), y)
            _sgd_step(loss_adv + loss_clean, optimizer)

    t = interleaved_median_times({
        'plain': lambda: _sgd_step(F.cross_entropy(plain(x), y), plain_opt),
        'ours': lambda: _sgd_step(task(x, y)['loss'], optimizer),
        'front': lambda: torch.no_grad()(advbn.front)(model, x),
        'attack_1': attack_call(one_step),
        'attack_k': attack_call(attack),
        'back_train': back_train,
        'recompute': recompute_front_step,
        'official': official_step,
        'official_no_anomaly': lambda: official_step(anomaly=False),
    }, args.steps, args.warmup, device)
    t_plain, t_front, t_back_train = t['plain'], t['front'], t['back_train']
    k = args.attack_steps
    t_attack = (t['attack_k'] - t['attack_1']) / (k - 1) if k > 1 else t['attack_1']
    t_setup = t['attack_1'] - t_attack
    t_ideal = t_front + k * t_attack + t_back_train

    print(f'model={args.model} img={args.img_size} batch={n} device={device} torch={torch.__version__} '
          f'threads={torch.get_num_threads()} cut={advbn.stage!r} K={args.attack_steps} dual_bn={dual}')
    print(f'unit costs / plain step: front (no grad) {t_front / t_plain:.3f}, back attack pass (grad for a, b) '
          f'{t_attack / t_plain:.3f} (+ {t_setup / t_plain:.3f} set-up per attack call), back training pass (2N, '
          f'weight grads + SGD) {t_back_train / t_plain:.3f}')
    print(f'official code vs ours, per step / plain: anomaly detection {(t["official"] - t["official_no_anomaly"]) / t_plain:.3f}, '
          f'structure (two N back passes vs one 2N pass) {(t["official_no_anomaly"] - t["ours"]) / t_plain:.3f}')
    print('| mode | step / plain | step / ideal |')
    print('|---|---|---|')
    for name, seconds in (('plain', t_plain), ('ideal', t_ideal), ('advbn (ours)', t['ours']),
                          ('front recomputed + anomaly detection', t['recompute']),
                          ('official code structure (front once, anomaly detection, separate back passes)',
                           t['official']),
                          ('official structure, no anomaly detection', t['official_no_anomaly'])):
        print(f'| {name} | {seconds / t_plain:.2f} | {seconds / t_ideal:.2f} |')


if __name__ == '__main__':
    main()

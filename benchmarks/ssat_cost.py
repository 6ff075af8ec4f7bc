#!/usr/bin/env python3
"""Self-supervised AT cost, as ratios measured in one process on the same model and real batch.

* stage-2 step (``ssat``: kNN-guided PGD + InfoNCE on clean/adversarial pairs) / stage-1 step
  (``contrastive``: InfoNCE on two augmented views), both full training steps with the optimiser;
* the ideal of a stage-2 step from measured unit costs: one training step on clean + adversarial
  (2x batch, the same work as a stage-1 step on two views) plus ``steps`` attack passes (forward +
  input-only backward) plus two no-grad forwards (the kNN's clean reference and the fooling check);
* one bank refresh (embedding the training split) / one stage-1 step, and as a share of a stage-1
  and a stage-2 epoch over the same split.

    python benchmarks/ssat_cost.py --model resnet10t --img-size 32 --batch-size 64
"""
import argparse
import os
import sys

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_adv.attacks import create_knn_guided_attack  # noqa: E402
from timm_adv.data import ViewAugment, create_bank_loader  # noqa: E402
from timm_adv.layers import insert_projection_head  # noqa: E402
from timm_adv.tasks import ContrastiveTask, SSATTask  # noqa: E402
from common import median_time, task_update  # noqa: E402  (benchmarks/common.py, beside this script)

CPU = torch.device('cpu')


def _train_step(task, optimizer, x, y):
    def step():
        task.train()
        task_update(task, optimizer, x, y)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--attack-steps', type=int, default=10, help='stage-2 guided PGD steps (default: 10)')
    parser.add_argument('--eps', type=float, default=0.03)
    parser.add_argument('--guides', type=int, default=300)
    parser.add_argument('--bank-samples', type=int, default=None, help='bank of N training images (default: all)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per measurement (median)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    data_config = dict(input_size=(3, args.img_size, args.img_size), interpolation='bilinear', crop_pct=1.0,
                       crop_mode='center', mean=mean, std=std)
    bank_loader = create_bank_loader('bundled/mnist', None, 'train', data_config, batch_size=256,
                                     num_samples=args.bank_samples)
    x, y = next(iter(create_bank_loader('bundled/mnist', None, 'train', data_config, batch_size=args.batch_size,
                                        num_samples=args.batch_size)))
    steps_per_epoch = len(bank_loader.dataset) // args.batch_size

    stage1_model = insert_projection_head(timm.create_model(args.model))
    stage1 = ContrastiveTask(stage1_model, bank_loader, 10, ViewAugment(hflip=0.0), mean=mean, std=std,
                             verbose=False)
    stage2_model = timm.create_model(args.model, num_classes=0)
    stage2_model.load_state_dict({k: v for k, v in stage1_model.state_dict().items()
                                  if not k.startswith('projection_head.')})
    attack = create_knn_guided_attack(eps=args.eps, steps=args.attack_steps, num_guides=args.guides, mean=mean, std=std)
    stage2 = SSATTask(stage2_model, bank_loader, 10, attack, mean=mean, std=std, verbose=False)

    t_stage1 = median_time(_train_step(stage1, torch.optim.SGD(stage1_model.parameters(), lr=1e-3, momentum=0.9), x, y),
                           args.steps, args.warmup, CPU)
    stage2.on_epoch_start(0)  # the epoch's bank, embedded once
    t_stage2 = median_time(_train_step(stage2, torch.optim.SGD(stage2_model.parameters(), lr=1e-3, momentum=0.9), x, y),
                           args.steps, args.warmup, CPU)

    def attack_pass():
        delta = torch.zeros_like(x, requires_grad=True)
        torch.autograd.grad(stage2_model(x + delta).sum(), delta)

    def forward():
        with torch.no_grad():
            stage2_model(x)

    stage2_model.eval()
    t_attack = median_time(attack_pass, args.steps, args.warmup, CPU)
    t_forward = median_time(forward, args.steps, args.warmup, CPU)

    def refresh():
        stage2.after_step()  # weights "changed": the next feature_bank() re-embeds the split
        stage2.feature_bank()

    t_bank = median_time(refresh, max(1, args.steps // 2), 0, CPU)
    ideal = t_stage1 + args.attack_steps * t_attack + 2 * t_forward
    rows = [
        ('stage-2 step / stage-1 step', t_stage2 / t_stage1),
        ('stage-2 ideal / stage-1 step', ideal / t_stage1),
        ('stage-2 measured / ideal', t_stage2 / ideal),
        ('attack pass / stage-1 step', t_attack / t_stage1),
        ('bank refresh / stage-1 step', t_bank / t_stage1),
        ('bank refresh / stage-1 epoch', t_bank / (steps_per_epoch * t_stage1)),
        ('bank refresh / stage-2 epoch', t_bank / (steps_per_epoch * t_stage2)),
    ]
    print(f'{args.model} at {args.img_size}px, batch {args.batch_size}, guided PGD-{args.attack_steps} '
          f'(m={args.guides}), bank {len(bank_loader.dataset)} images, {steps_per_epoch} steps per epoch, '
          f'median of {args.steps} steps, threads {torch.get_num_threads()}')
    print('| ratio | value |\n|---|---|')
    for name, value in rows:
        print(f'| {name} | {value:.3f} |')
    return dict(rows)


if __name__ == '__main__':
    main()

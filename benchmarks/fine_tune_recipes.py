#!/usr/bin/env python3
"""Does each fine-tuning method's obvious command keep its starting checkpoint's clean accuracy?

Trains one plain resnet10t on the bundled digits (``--epochs 3``, the recipe otherwise), then runs the
command a user would type for each fine-tuning method from its checkpoint, with nothing but the method
and the checkpoint (the recipe supplies the fine-tuning defaults), and prints clean top-1 on the 1,000
validation digits before and after (SSAT: kNN top-1 over the training split, k = 75). The criterion is a
drop of at most one point. ``--lr 0.05 --weight-decay 5e-4 --epochs 1`` as ``--extra`` replays the
from-scratch settings the recipe used to give.

    python benchmarks/fine_tune_recipes.py --output /tmp/fine_tune
    python benchmarks/fine_tune_recipes.py --output /tmp/fine_tune --skip-base --methods advbn --extra --lr 0.05 --epochs 1
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402

from timm_adv.cli import train  # noqa: E402
from timm_adv.data import create_bank_loader  # noqa: E402
from timm_adv.evaluation import create_feature_model, create_knn_classifier, evaluate_accuracy  # noqa: E402
from timm_adv.models import build_feature_bank  # noqa: E402
from timm_adv.utils import checkpoint_state_dict, read_checkpoint  # noqa: E402

DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.485, 0.456, 0.406),
                   std=(0.229, 0.224, 0.225), crop_pct=1.0)
COMMANDS = {
    'advbn': ['--adv-method', 'advbn', '--initial-checkpoint', '{ckpt}'],
    'advprop': ['--adv-method', 'advprop', '--initial-checkpoint', '{ckpt}'],
    'ssat': ['--adv-method', 'ssat', '--pretrained', '--pretrained-path', '{ckpt}'],
}


def knn_top1(checkpoint: str) -> float:
    backbone = create_feature_model('resnet10t', checkpoint=checkpoint).eval()
    bank = build_feature_bank(backbone, create_bank_loader('bundled/mnist', None, 'train', DATA_CONFIG), 10)
    val = create_bank_loader('bundled/mnist', None, 'validation', DATA_CONFIG)
    return evaluate_accuracy(create_knn_classifier(backbone, bank, k=75), val)['top1']


def clean_top1(checkpoint: str) -> float:
    model = timm.create_model('resnet10t', num_classes=10)
    model.load_state_dict(checkpoint_state_dict(read_checkpoint(checkpoint, '--checkpoint')))
    val = create_bank_loader('bundled/mnist', None, 'validation', DATA_CONFIG)
    return evaluate_accuracy(model.eval(), val)['top1']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True)
    parser.add_argument('--methods', nargs='+', choices=tuple(COMMANDS), default=list(COMMANDS))
    parser.add_argument('--skip-base', action='store_true', help='reuse <output>/plain/last.pth.tar')
    parser.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='flags added to every fine-tuning run')
    args = parser.parse_args()
    common = ['--model', 'resnet10t', '--log-interval', '1000', '--seed', '0', '--output', args.output]
    checkpoint = os.path.join(args.output, 'plain', 'last.pth.tar')
    if not args.skip_base:
        train.main([*common, '--epochs', '3', '--experiment', 'plain'])
    for method in args.methods:
        argv = [a.format(ckpt=checkpoint) for a in COMMANDS[method]]
        metrics = train.main([*common, *argv, *args.extra, '--experiment', method])
        before = knn_top1(checkpoint) if method == 'ssat' else clean_top1(checkpoint)
        after = metrics['top1']
        verdict = 'ok' if after >= before - 1.0 else 'DROPS'
        print(f'{method}: {" ".join(argv + args.extra)} -> clean top-1 {before:.1f} -> {after:.1f} ({verdict})',
              flush=True)


if __name__ == '__main__':
    main()

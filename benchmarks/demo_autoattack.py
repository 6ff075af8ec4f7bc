#!/usr/bin/env python3
"""AutoAttack (standard, L-inf eps 0.1) on the demo's PGD-AT model, 200 evenly spaced held-out digits.

Trains the demo's PGD-AT model with the demo's exact flags (or takes ``--checkpoint``, e.g. a
``python demo.py`` run's ``pgd-at/last.pth.tar``), then runs exactly

    validate.py --checkpoint ... --autoattack standard --aa-eps 0.1 --aa-samples 200

and prints clean and AutoAttack top-1. AutoAttack takes a long time on CPU (APGD-T and FAB-T try 9
target classes, Square 5,000 queries, on every digit still robust): run it with nohup and a log.

    python benchmarks/demo_autoattack.py [--checkpoint PATH] [--epochs 8]

Target (issue 14): >= 94% under AutoAttack with >= 98% clean on those 200 digits.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import demo  # noqa: E402  (the demo's exact flags and its way of running the scripts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None, help='evaluate this checkpoint instead of training one')
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--samples', type=int, default=200)
    parser.add_argument('--output', default='/tmp/demo_autoattack')
    args = parser.parse_args()
    out = os.path.join(args.output, time.strftime('%Y%m%d-%H%M%S'))
    checkpoint = args.checkpoint
    if checkpoint is None:
        demo.run(['train.py', *demo.COMMON, *demo.METHODS['pgd-at'], '--epochs', str(args.epochs), '--output', out,
              '--experiment', 'pgd-at'])
        checkpoint = os.path.join(out, 'pgd-at', 'last.pth.tar')
    os.makedirs(out, exist_ok=True)
    results_file = os.path.join(out, 'autoattack.json')
    start = time.time()
    demo.run(['validate.py', '--checkpoint', checkpoint, '--workers', '0', '--autoattack', 'standard',
          '--aa-eps', demo.EPS, '--aa-samples', str(args.samples), '--results-file', results_file,
          '--results-format', 'json'])
    with open(results_file) as f:
        res = json.load(f)[0]
    print(f'\n{checkpoint}: AutoAttack standard, L-inf eps {demo.EPS}, {res["aa_samples"]} evenly spaced held-out '
          f'digits: clean {res["aa_clean_top1"]:.1f}%, robust {res["aa_top1"]:.1f}% '
          f'({(time.time() - start) / 60:.0f} min of evaluation)')


if __name__ == '__main__':
    main()

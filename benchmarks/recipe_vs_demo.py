#!/usr/bin/env python3
"""The short PGD-AT command on the bundled recipe vs the demo's PGD-AT command: time and accuracy.

Trains both back to back in one run (so CPU contention hits both alike), then evaluates each last
checkpoint with validate.py on the 1,000 held-out digits (clean, PGD-20 at eps 0.1 with step 0.01):

    python benchmarks/recipe_vs_demo.py [--epochs 10] [--output /tmp/recipe_vs_demo]

Target (issue 14): the short command reaches >= 97% clean and >= 90% PGD-20 in <= 1.2x the demo's time.
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
    parser.add_argument('--epochs', type=int, default=demo.EPOCHS)
    parser.add_argument('--output', default='/tmp/recipe_vs_demo')
    parser.add_argument('--no-validate', action='store_true', help='time the trainings only')
    args = parser.parse_args()
    out = os.path.join(args.output, time.strftime('%Y%m%d-%H%M%S'))
    commands = {
        'demo PGD-AT': [*demo.COMMON, *demo.METHODS['pgd-at']],
        'recipe': ['--adv-method', 'pgd', '--adv-eps', demo.EPS],
    }
    rows = {}
    for i, (name, flags) in enumerate(commands.items()):
        start = time.time()
        demo.run(['train.py', *flags, '--epochs', str(args.epochs), '--output', out, '--experiment', str(i)])
        seconds = time.time() - start
        res = {}
        if not args.no_validate:
            results_file = os.path.join(out, f'{i}-validate.json')
            demo.run(['validate.py', '--checkpoint', os.path.join(out, str(i), 'last.pth.tar'), '--workers', '0',
                  '--attack', 'pgd', '--eps', demo.EPS, '--steps', '20', '--step-size', '0.01',
                  '--results-file', results_file, '--results-format', 'json'])
            with open(results_file) as f:
                res = json.load(f)[0]
        rows[name] = (seconds, res)

    base = rows['demo PGD-AT'][0]
    print(f'\nbundled/mnist, resnet10t, {args.epochs} epochs, trained back to back')
    print('| command | train time (s) | time / demo | clean top-1 | PGD-20 top-1 (eps 0.1) |')
    print('|---|---|---|---|---|')
    for name, (seconds, res) in rows.items():
        clean, pgd = res.get('top1', float('nan')), res.get('pgd20_top1', float('nan'))
        print(f'| {name} | {seconds:.0f} | {seconds / base:.2f} | {clean:.1f} | {pgd:.1f} |')


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""The timm-adv demo: plain vs PGD adversarial training on the bundled digits, on CPU, in minutes.

Runs exactly the commands a user would type:

1. ``train.py`` a small timm model (resnet10t, 32 px) normally, and with PGD-AT (L-inf eps 0.1, 5 steps);
2. ``validate.py`` both on the held-out split: clean top-1, and top-1 under PGD-20 at eps 0.05, 0.1, 0.15;
3. prints the side-by-side table (eps 0.1) and checks the target (PGD-AT: >= 92% PGD-20 with >= 97% clean);
4. ``tools/plot_demo.py`` draws both models' top-1 against eps into ``demo_robustness.png`` (the README's
   picture: ``python tools/plot_demo.py <run folder> --out docs/images/demo_robustness.png``).

Its flags are the bundled/mnist recipe (``timm_adv/data/recipes.py``), spelled out: ``python train.py
--adv-method pgd --adv-eps 0.1`` trains the same PGD-AT model (``tests/test_recipes.py`` checks it).

    python demo.py [--epochs 10] [--output output/demo]
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EPS = '0.1'
PLOT_EPS = ['0.05', EPS, '0.15']  # the accuracy-vs-eps picture; the table and target use EPS
EPOCHS = 10

COMMON = ['--model', 'resnet10t', '--no-aug', '-b', '64', '--opt', 'sgd', '--lr', '0.05', '--weight-decay', '5e-4',
          '--warmup-epochs', '0', '--smoothing', '0', '--workers', '0', '--adv-val-samples', '200', '--adv-val-steps', '10', '--adv-val-eps', EPS,
          '--log-interval', '20']
ROBUST_KEY = f'pgd20_top1@{float(EPS):.4g}'  # validate.py's key of one eps among several
METHODS = {
    'plain': ['--adv-method', 'none'],
    'pgd-at': ['--adv-method', 'pgd', '--adv-eps', EPS, '--adv-steps', '5', '--adv-step-size', '0.025'],
}


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    subprocess.run([sys.executable] + cmd, cwd=HERE, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--output', default=os.path.join('output', 'demo'))
    parser.add_argument('--experiment', default=time.strftime('%Y%m%d-%H%M%S'))
    args = parser.parse_args()
    out_root = os.path.join(args.output, args.experiment)

    rows = {}
    for name, flags in METHODS.items():
        start = time.time()
        run(['train.py', *COMMON, *flags, '--epochs', str(args.epochs), '--output', out_root, '--experiment', name])
        train_minutes = (time.time() - start) / 60
        results_file = os.path.join(out_root, f'{name}-validate.json')
        run(['validate.py', '--model', 'resnet10t', '--checkpoint', os.path.join(out_root, name, 'last.pth.tar'),
             '--workers', '0', '--attack', 'pgd', '--eps', *PLOT_EPS, '--steps', '20', '--step-size', '0.01',
             '--results-file', results_file, '--results-format', 'json'])
        with open(results_file) as f:
            rows[name] = (json.load(f)[0], train_minutes)

    lines = [
        f'bundled/mnist validation split (1,000 real digits), resnet10t at 32 px, {args.epochs} epochs',
        f'| training | clean top-1 | PGD-20 top-1 (L-inf eps {EPS}) | train time (min) |',
        '|---|---|---|---|',
    ]
    for name, (res, minutes) in rows.items():
        lines.append(f'| {name} | {res["top1"]:.1f} | {res[ROBUST_KEY]:.1f} | {minutes:.1f} |')
    table = '\n'.join(lines)
    print('\n' + table)
    with open(os.path.join(out_root, 'demo.md'), 'w') as f:
        f.write(table + '\n')
    adv = rows['pgd-at'][0]
    ok = adv['top1'] >= 97.0 and adv[ROBUST_KEY] >= 92.0
    run(['tools/plot_demo.py', out_root])
    print(f'\nTarget (PGD-AT >= 97% clean and >= 92% PGD-20): {"met" if ok else "NOT met"}. Results in {out_root}')


if __name__ == '__main__':
    main()

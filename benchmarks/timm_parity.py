#!/usr/bin/env python3
"""Side by side with timm: the same run through timm's own train.py / validate.py and through ours.

Trains the same model on the same ImageFolder with the same flags and seed, once with timm's
``train.py`` and once with ours (``--adv-method none``), on CPU with no loader workers, without and
with ``--model-ema``; compares ``summary.csv`` cell by cell, its header, and the ``model_best`` epoch.
Then validates one checkpoint with timm's ``validate.py`` and ours and compares the results. Every
difference is printed; the exit status is 1 when there is one.

timm's scripts are not part of timm's wheel; take them from the timm commit the flag fixtures are pinned to
(``tests/data/timm_train_flags.txt``), outside this repository, e.g.:

    git -C pytorch-image-models show aa4b5850:train.py > /tmp/timm_ref/train.py
    git -C pytorch-image-models show aa4b5850:validate.py > /tmp/timm_ref/validate.py
    python benchmarks/timm_parity.py --timm-train /tmp/timm_ref/train.py --timm-validate /tmp/timm_ref/validate.py

Without ``--data-dir`` a tiny 10-class ImageFolder (random images, 32 px) is written to the output folder.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from typing import Dict, List, Sequence

import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(root: str, train_per_class: int = 8, val_per_class: int = 4, classes: int = 10) -> str:
    """A learnable tiny ImageFolder: class ``c`` is noise around a grey level of its own."""
    g = torch.Generator().manual_seed(0)
    for split, per_class in (('train', train_per_class), ('validation', val_per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=g) * 80 + c * 17).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, str(c), f'{i}.png'))
    return root


def read_summary(path: str) -> List[Dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def compare_summaries(timm_rows, our_rows, rel_tol: float) -> List[str]:
    """Every difference between two ``summary.csv``: header, row count, and each cell beyond ``rel_tol``."""
    diffs = []
    timm_cols, our_cols = list(timm_rows[0]) if timm_rows else [], list(our_rows[0]) if our_rows else []
    if timm_cols != our_cols:
        diffs.append(f'header: timm {timm_cols} vs ours {our_cols}')
    if len(timm_rows) != len(our_rows):
        diffs.append(f'rows: timm {len(timm_rows)} vs ours {len(our_rows)}')
    for t_row, o_row in zip(timm_rows, our_rows):
        for col in timm_cols:
            if col not in o_row:
                continue
            t, o = float(t_row[col]), float(o_row[col])
            if abs(t - o) > rel_tol * max(abs(t), abs(o), 1e-12):
                diffs.append(f'epoch {t_row["epoch"]} {col}: timm {t_row[col]} vs ours {o_row[col]}')
    return diffs


def best_epoch(run_dir: str) -> int:
    with torch.serialization.safe_globals([argparse.Namespace]):  # both scripts save their args
        ckpt = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), map_location='cpu', weights_only=True)
    return int(ckpt['epoch'])


def run_script(script: str, argv: Sequence[str], log: str) -> str:
    """Runs ``python script argv`` (from the repository root, 1 thread), its output to ``log``; returns stdout."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    with open(log, 'w') as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f'{script} failed (exit {proc.returncode}); see {log}:\n{proc.stderr[-2000:]}')
    return proc.stdout


def parse_result(stdout: str) -> dict:
    """The JSON both validate.py scripts print after ``--result``."""
    return json.loads(stdout.split('--result', 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--timm-train', required=True, help="timm's train.py (from a timm source tree)")
    parser.add_argument('--timm-validate', default='', help="timm's validate.py (skip the validate comparison if unset)")
    parser.add_argument('--data-dir', default='', help='ImageFolder with train/ and validation/ (default: a tiny one)')
    parser.add_argument('--output', default='/tmp/timm_parity')
    parser.add_argument('--model', default='test_resnet')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--rel-tol', type=float, default=1e-5, help='relative tolerance of a cell (float noise)')
    parser.add_argument('--extra', nargs=argparse.REMAINDER, default=[],
                        help='more flags given to both train.py scripts (everything after --extra)')
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    data_dir = args.data_dir or write_image_folder(os.path.join(args.output, 'data'))
    common = ['--data-dir', data_dir, '--model', args.model, '--img-size', '32', '-b', '8', '--epochs', str(args.epochs),
              '--warmup-epochs', '1', '--lr', '0.05', '--workers', '0', '--seed', '0', '--log-interval', '1000',
              '--device', 'cpu', '--output', args.output, *args.extra]
    differences = []
    for ema in (False, True):
        name = 'ema' if ema else 'plain'
        flags = [*common, '--model-ema', '--model-ema-decay', '0.9'] if ema else common
        runs = {}
        for who, script, extra in (('timm', args.timm_train, []),
                                   ('ours', os.path.join(REPO, 'train.py'), ['--adv-method', 'none'])):
            experiment = f'{name}-{who}'
            if os.path.exists(os.path.join(args.output, experiment)):
                raise SystemExit(f'{os.path.join(args.output, experiment)} exists; pick a fresh --output.')
            run_script(script, [*flags, *extra, '--experiment', experiment],
                       os.path.join(args.output, f'{experiment}.log'))
            runs[who] = os.path.join(args.output, experiment)
        diffs = compare_summaries(read_summary(os.path.join(runs['timm'], 'summary.csv')),
                                  read_summary(os.path.join(runs['ours'], 'summary.csv')), args.rel_tol)
        best = {who: best_epoch(d) for who, d in runs.items()}
        if best['timm'] != best['ours']:
            diffs.append(f'model_best epoch: timm {best["timm"]} vs ours {best["ours"]}')
        print(f'[train {name}] {len(diffs)} difference(s); model_best epoch timm {best["timm"]}, ours {best["ours"]}')
        differences += [f'[train {name}] {d}' for d in diffs]

        if args.timm_validate:
            ckpt = os.path.join(runs['ours'], 'model_best.pth.tar')
            val = ['--data-dir', data_dir, '--split', 'validation', '--model', args.model, '--img-size', '32', '-b', '8',
                   '--workers', '0', '--checkpoint', ckpt, '--device', 'cpu', '--log-freq', '1000']
            res = {who: parse_result(run_script(script, val, os.path.join(args.output, f'{name}-validate-{who}.log')))
                   for who, script in (('timm', args.timm_validate), ('ours', os.path.join(REPO, 'validate.py')))}
            vdiffs = [f'{k}: timm {v} vs ours {res["ours"].get(k)}' for k, v in res['timm'].items()
                      if k not in ('param_count',) and (
                          res['ours'].get(k) != v if not isinstance(v, float)
                          else abs(v - res['ours'].get(k, float('nan'))) > args.rel_tol * max(abs(v), 1e-12))]
            print(f'[validate {name}] {len(vdiffs)} difference(s); timm {res["timm"]}')
            differences += [f'[validate {name}] {d}' for d in vdiffs]
    print(f'\n{len(differences)} difference(s)')
    for d in differences:
        print(' ', d)
    sys.exit(1 if differences else 0)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Writes the timm train.py fixtures of tests/test_timm_parity.py from a timm source tree.

* ``tests/data/timm_train_flags.txt``: every option string of timm's train.py (positionals by name).
* ``tests/data/timm_args.yaml``: the ``args.yaml`` timm's train.py writes for a typical command, made by
  timm's own ``_parse_args()`` (timm dumps ``args.__dict__`` right after parsing, before any run-time key).

Needs the installed timm (timm's train.py imports it at module level) and git:

    python tools/timm_train_fixtures.py /path/to/pytorch-image-models.git aa4b5850c1543fa488abf260f18390eda46cf85d
"""
import argparse
import ast
import importlib.util
import os
import subprocess
import sys
import tempfile

import yaml

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'data')
# a typical timm ImageNet recipe: one flag from most groups, several that timm-adv had lacked
COMMAND = [
    '--data-dir', '/data/imagenet', '--model', 'resnet50', '--img-size', '224', '-b', '128', '--grad-accum-steps', '2',
    '--opt', 'lamb', '--lr', '5e-3', '--weight-decay', '0.02', '--layer-decay', '0.75',
    '--layer-decay-min-scale', '0.1', '--sched', 'cosine', '--epochs', '100', '--warmup-epochs', '5',
    '--lr-noise', '0.4', '0.9', '--lr-noise-pct', '0.5', '--aa', 'rand-m7-mstd0.5-inc1', '--reprob', '0.25',
    '--mixup', '0.1', '--cutmix', '1.0', '--smoothing', '0.1', '--bce-loss', '--bce-target-thresh', '0.2',
    '--drop-path', '0.05', '--model-ema', '--model-ema-decay', '0.9999', '--amp', '--amp-dtype', 'bfloat16',
    '--color-jitter-prob', '0.8', '--grayscale-prob', '0.1', '--val-interval', '2', '--train-num-samples', '50000',
    '--worker-seeding', 'part', '--seed', '0', '--log-wandb', '--wandb-project', 'adv', '--wandb-tags', 'r50', 'lamb',
    '--experiment', 'r50-lamb', '--channels-last', '--pin-mem',
]


def _option_strings(source: str):
    tree = ast.parse(source)
    return sorted({a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'attr', '') == 'add_argument'
                   for a in n.args if isinstance(a, ast.Constant)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('repo', help='a git clone (or bare repository) of huggingface/pytorch-image-models')
    parser.add_argument('commit', help='the commit to read train.py from')
    args = parser.parse_args()
    source = subprocess.check_output(['git', '-C', args.repo, 'show', f'{args.commit}:train.py'], text=True)
    version = subprocess.check_output(['git', '-C', args.repo, 'show', f'{args.commit}:timm/version.py'], text=True)
    version = version.split('=')[-1].strip().strip('\'"')
    origin = f'huggingface/pytorch-image-models@{args.commit} train.py ({version})'

    flags = _option_strings(source)
    with open(os.path.join(DATA, 'timm_train_flags.txt'), 'w') as f:
        f.write(f'# Every option string of timm\'s train.py (positionals by name), one a line; tests/test_timm_parity.py\n'
                f'# checks that our train.py accepts each. Source: {origin}.\n'
                f'# Regenerate: python tools/timm_train_fixtures.py TIMM_REPO COMMIT\n')
        f.write('\n'.join(flags) + '\n')

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'timm_train.py')
        with open(path, 'w') as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location('timm_train', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.argv = ['train.py', *COMMAND]
        _, args_text = module._parse_args()
    with open(os.path.join(DATA, 'timm_args.yaml'), 'w') as f:
        f.write(f'# args.yaml written by timm\'s own train.py parser (_parse_args, as its run does), {origin},\n'
                f'# installed timm {importlib.import_module("timm").__version__}, for the command:\n'
                f'#   train.py {" ".join(COMMAND)}\n'
                f'# Regenerate: python tools/timm_train_fixtures.py TIMM_REPO COMMIT\n')
        f.write(args_text)
    print(f'{len(flags)} flags, args.yaml with {len(yaml.safe_load(args_text))} keys from {origin}')


if __name__ == '__main__':
    main()

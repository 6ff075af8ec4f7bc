#!/usr/bin/env python3
"""Redraws the demo's side-by-side robustness plot (plain vs PGD-AT, top-1 vs eps) from a demo run.

Reads the ``validate.py --results-file`` JSON files that ``demo.py`` wrote into its run folder
(``<method>-validate*.json``; several files of one method, e.g. one eps each, merge into one curve)
and writes the PNG the README shows:

    python tools/plot_demo.py output/demo/<experiment> --out docs/images/demo_robustness.png

The committed picture comes from the fresh-clone demo run whose validate.py results are in
``docs/images/demo_run`` (eps 0.05 and 0.15 measured afterwards on its checkpoints, one file each):

    python tools/plot_demo.py docs/images/demo_run --out docs/images/demo_robustness.png
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timm_adv.evaluation.report import plot_robustness_comparison, results_accuracy_vs_eps  # noqa: E402

METHODS = ('plain', 'pgd-at')
TITLE = 'Demo: resnet10t, 1,000 held-out digits, PGD-20 (eps 0: clean)'


def demo_curves(run_dir: str) -> dict:
    """``{method: [(eps, top1), ...]}`` from the demo run's validate.py results files."""
    curves = {}
    for method in METHODS:
        files = sorted(glob.glob(os.path.join(run_dir, f'{method}-validate*.json')))
        if not files:
            raise FileNotFoundError(f'{run_dir!r} holds no {method}-validate*.json; give the folder of a demo.py run.')
        rows = [row for path in files for row in json.load(open(path))]
        curves[method] = results_accuracy_vs_eps(rows)
    return curves


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', help='the demo run folder (output/demo/<experiment>)')
    parser.add_argument('--out', default=None, help='PNG to write (default: <run_dir>/demo_robustness.png)')
    args = parser.parse_args(argv)
    path = plot_robustness_comparison(demo_curves(args.run_dir), args.out or os.path.join(args.run_dir, 'demo_robustness.png'),
                                      title=TITLE)
    print(path)
    return path


if __name__ == '__main__':
    main()

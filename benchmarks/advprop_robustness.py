"""Clean, corrupted and small-eps PGD accuracy of training checkpoints on the bundled validation set.

Compares runs that differ only in ``--adv-method`` (e.g. AdvProp against plain training). Each
checkpoint is loaded as a plain timm model (AdvProp checkpoints hold the plain model), then
evaluated on the 1,000 bundled MNIST validation digits:

* clean;
* Gaussian noise (sigma in pixel units) and Gaussian blur, fixed seed, images kept in [0, 1];
* PGD L-inf (untargeted, eval-mode BN) at small radii.

Example:
    python benchmarks/advprop_robustness.py --model test_resnet \\
        plain=output/plain/last.pth.tar advprop=output/advprop/last.pth.tar
"""
import argparse
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.data import create_loader, resolve_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from timm_adv.attacks import PixelNormalizer, create_attack, parse_eps
from timm_adv.data import DEFAULT_DATASET, apply_bundled_defaults, create_dataset
from timm_adv.evaluation import evaluate_accuracy
from timm_adv.utils import load_training_checkpoint


class Corruption:
    """A fixed pixel-space corruption, called like an attack: ``(model, x, target) -> x'``."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], mean, std, seed: int = 0):
        self.fn = fn
        self.normalizer = PixelNormalizer(mean, std)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pixels = self.fn(self.normalizer.to_pixel(x), self.generator).clamp(0.0, 1.0)
        return self.normalizer.from_pixel(pixels)


def gaussian_noise(sigma: float):
    return lambda x, g: x + sigma * torch.randn(x.shape, generator=g).to(x)


def gaussian_blur(sigma: float, size: int = 5):
    def blur(x, g):
        t = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
        k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        weight = k2.expand(x.shape[1], 1, size, size)
        return F.conv2d(F.pad(x, [size // 2] * 4, mode='reflect'), weight, groups=x.shape[1])
    return blur


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', metavar='NAME=CHECKPOINT')
    parser.add_argument('--model', required=True)
    parser.add_argument('--pgd-eps', nargs='+', default=['1/255', '2/255', '8/255'])
    parser.add_argument('--pgd-steps', type=int, default=10)
    parser.add_argument('--noise', type=float, nargs='+', default=[0.1, 0.3])
    parser.add_argument('--blur', type=float, nargs='+', default=[1.0])
    parser.add_argument('-b', '--batch-size', type=int, default=250)
    args = parser.parse_args(argv)
    data_args = argparse.Namespace(dataset=DEFAULT_DATASET, input_size=None, img_size=None, crop_pct=None,
                                   interpolation='', num_classes=None)
    apply_bundled_defaults(data_args)

    dataset = create_dataset(DEFAULT_DATASET, split='validation')
    results = {}
    for run in args.runs:
        name, _, path = run.partition('=')
        if not path:
            parser.error(f'runs are NAME=CHECKPOINT, got {run!r}')
        model = timm.create_model(args.model, num_classes=data_args.num_classes)
        model = load_training_checkpoint(model, path).eval()
        cfg = resolve_data_config(vars(data_args), model=model)
        loader = create_loader(dataset, input_size=cfg['input_size'], batch_size=args.batch_size, is_training=False,
                               interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'], mean=cfg['mean'],
                               std=cfg['std'], num_workers=0, use_prefetcher=False)
        evals = {'clean': None}
        evals.update({f'noise{s:g}': Corruption(gaussian_noise(s), cfg['mean'], cfg['std']) for s in args.noise})
        evals.update({f'blur{s:g}': Corruption(gaussian_blur(s), cfg['mean'], cfg['std']) for s in args.blur})
        evals.update({f'pgd{args.pgd_steps}@{e}': create_attack(
            parse_eps(e), steps=args.pgd_steps, bn_mode='eval', mean=cfg['mean'], std=cfg['std'])
            for e in args.pgd_eps})
        torch.manual_seed(0)
        results[name] = {k: evaluate_accuracy(model, loader, attack=a)['top1'] for k, a in evals.items()}
    columns = list(next(iter(results.values())))
    print('run       ' + ''.join(f'{c:>14s}' for c in columns))
    for name, row in results.items():
        print(f'{name:<10s}' + ''.join(f'{row[c]:14.1f}' for c in columns))
    return results


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""MAE fine-tuning end to end on CPU: a tiny MAE pre-trained on the bundled digits, then PGD-AT fine-tuning.

1. Pre-trains a masked autoencoder (He et al., CVPR 2022) on the 4,000 bundled training digits: a
   timm ``test_vit`` encoder (width 64, depth 6; 8 px patches at 32 px: a 4x4 grid) sees 25% of
   the patches, a 2-block decoder reconstructs the rest, loss on per-patch normalised pixels of the
   masked patches (MAE's ``norm_pix_loss``). Saved in the original release format: ``{'model':
   encoder + decoder + mask_token, 'epoch', 'args'}``. The encoder learns its position embedding
   (MAE fixes a sin-cos one) to stay a plain timm ViT.
2. Fine-tunes with ``train.py`` exactly as a user would (``--pretrained --pretrained-path``: MAE
   format detected, decoder dropped, new head and ``fc_norm``), with layer decay, gradient
   accumulation and PGD-AT; and the same command from random initialisation for comparison.
3. Prints clean and PGD-20 top-1 (``validate.py``) on the 1,000 held-out digits for both.

    OMP_NUM_THREADS=1 python benchmarks/mae_tiny_digits.py --output /tmp/mae_tiny
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import timm  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from timm_adv.data import create_dataset  # noqa: E402

IMG = 32


def model_flags(patch: int) -> list:
    # the pre-training normalisation (ImageNet mean/std, as MAE's releases) is given to train.py and validate.py
    return ['--model', 'test_vit', '--model-kwargs', f'patch_size={patch}', f'img_size={IMG}', '--gp', 'avg',
            '--mean', *map(str, IMAGENET_DEFAULT_MEAN), '--std', *map(str, IMAGENET_DEFAULT_STD)]


class TinyMAE(nn.Module):
    """MAE around a timm ViT encoder; parameter names follow the original release (``decoder_*``, ``mask_token``)."""

    def __init__(self, encoder: nn.Module, decoder_dim: int = 48, decoder_depth: int = 2, mask_ratio: float = 0.75):
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        num_patches, dim = encoder.patch_embed.num_patches, encoder.embed_dim
        self.patch = encoder.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, 2, mlp_ratio=4, qkv_bias=True)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def state_dict_mae_format(self):
        """The original MAE layout: encoder keys at the top level, then the decoder and mask token."""
        out = dict(self.encoder.state_dict())
        out.update({k: v for k, v in self.state_dict().items() if not k.startswith('encoder.')})
        return out

    def forward(self, imgs):
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.rand(n, length, device=x.device).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(n, -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))

        x = self.decoder_embed(x)
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length - keep, -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

        target = F.unfold(imgs, self.patch, stride=self.patch).transpose(1, 2)  # (n, length, 3 * patch * patch)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(n, length, device=x.device)
        masked[:, :keep] = 0
        masked = masked.gather(1, ids_restore)
        return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()


def pretrain(path: Path, patch: int, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(IMG, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    data = create_dataset('bundled/mnist', split='train', is_training=True)
    data.transform = transform
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    encoder = timm.create_model('test_vit', patch_size=patch, img_size=IMG, num_classes=0, global_pool='token',
                                dynamic_img_size=False)  # tokens as (n, length, dim)
    mae = TinyMAE(encoder)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    steps, step = epochs * len(loader), 0
    start, losses = time.time(), []
    for epoch in range(epochs):
        total = 0.0
        for imgs, _ in loader:
            for group in optimizer.param_groups:  # MAE: linear warm-up (1 epoch here), then half-cycle cosine
                warm = len(loader)
                group['lr'] = lr * (step + 1) / warm if step < warm else \
                    lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm)))
            loss = mae(imgs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
        losses.append(total / len(loader))
        print(f'MAE pre-training epoch {epoch}: reconstruction loss {losses[-1]:.4f}', flush=True)
    tmp = path.with_suffix('.tmp')
    torch.save({'model': mae.state_dict_mae_format(), 'epoch': epochs - 1,
                'args': argparse.Namespace(model=f'test_vit_patch{patch}_mae', mask_ratio=mae.mask_ratio, norm_pix_loss=True)},
               tmp)
    os.replace(tmp, path)
    return dict(loss_first=losses[0], loss_last=losses[-1], minutes=(time.time() - start) / 60)


def run(cmd, log: Path) -> float:
    print('$ ' + ' '.join(cmd), flush=True)
    start = time.time()
    with open(log, 'w') as f:
        subprocess.run([sys.executable] + cmd, cwd=REPO, check=True, stdout=f, stderr=subprocess.STDOUT)
    return (time.time() - start) / 60


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='output/mae_tiny_digits')
    parser.add_argument('--patch-size', type=int, default=8, help='ViT patch size at 32 px (8: a 4x4 grid)')
    parser.add_argument('--pretrain-epochs', type=int, default=15)
    parser.add_argument('--epochs', type=int, default=6, help='fine-tuning epochs')
    parser.add_argument('--skip-pretrain', action='store_true', help='reuse the MAE checkpoint already in --output')
    parser.add_argument('--eps', default='0.1', help='PGD-AT and evaluation L-inf radius')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / 'mae_pretrain_test_vit.pth'
    if not args.skip_pretrain:
        pre = pretrain(checkpoint, args.patch_size, args.pretrain_epochs, 128, 1.5e-3, args.seed)
        print(f'MAE pre-training: loss {pre["loss_first"]:.3f} -> {pre["loss_last"]:.3f} in {pre["minutes"]:.1f} min')

    model = model_flags(args.patch_size)
    finetune = [*model, '--epochs', str(args.epochs), '-b', '64', '--grad-accum-steps', '2', '--opt', 'adamw',
                '--lr', '1e-3', '--weight-decay', '0.05', '--layer-decay', '0.65', '--drop-path', '0.1',
                '--sched-on-updates', '--warmup-epochs', '1', '--smoothing', '0.1', '--no-aug', '--workers', '0',
                '--seed', str(args.seed), '--adv-method', 'pgd', '--adv-eps', args.eps, '--adv-steps', '3',
                '--adv-clean-weight', '0.5', '--adv-val-samples', '200',
                '--log-interval', '10', '--output', str(out)]
    runs = {'MAE init': ['--pretrained', '--pretrained-path', str(checkpoint)], 'random init': []}
    rows = []
    for name, extra in runs.items():
        exp = name.replace(' ', '_')
        minutes = run(['train.py', *finetune, *extra, '--experiment', exp], out / f'{exp}.train.log')
        results = out / exp / 'pgd20.json'
        run(['validate.py', *model, '--checkpoint', str(out / exp / 'last.pth.tar'),
             '--attack', 'pgd', '--eps', args.eps, '--steps', '20', '-b', '250', '--workers', '0',
             '--results-file', str(results), '--results-format', 'json'], out / f'{exp}.validate.log')
        rows.append((name, json.loads(results.read_text())[0], minutes))

    print(f'\nFine-tuning test_vit ({args.patch_size} px patches, 32 px) for {args.epochs} epochs with PGD-AT (L-inf '
          f'{args.eps}, 3 steps, clean weight 0.5), layer decay 0.65, 2 accumulation steps; validate.py on the 1,000 '
          f'held-out digits:\n')
    print(f'| initialisation | clean top-1 | PGD-20 top-1 (L-inf {args.eps}) | fine-tuning time (min) |')
    print('|---|---|---|---|')
    for name, res, minutes in rows:
        print(f'| {name} | {res["top1"]:.1f} | {res["pgd20_top1"]:.1f} | {minutes:.1f} |')


if __name__ == '__main__':
    main()

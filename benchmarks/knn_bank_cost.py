#!/usr/bin/env python3
"""Memory and refresh time of the kNN feature bank, per storage dtype, and the same on paper for ImageNet.

For a bank of ``N x D`` features it prints, per ``--dtypes`` entry:

* bytes: the formula ``N * (D * s + 40)`` (``s`` bytes per feature element, int64 labels, 8 float32 input
  keys that find a training image's own entry) and the bytes of
  the bank actually built (they must agree: the bank is preallocated, no concatenation copy);
* peak allocator bytes while building it (CUDA only: ``torch.cuda.max_memory_allocated``);
* refresh time: filling the bank from a loader of ready features (the bank's own work, without the
  backbone's forward, which is the model's cost), and the faiss index build when faiss is installed;
* one batch search (top-``k``) and one guide selection, both chunked, with their working memory
  ``B x chunk x 4`` bytes (a dense product would hold ``B x N x 4``).

It then extrapolates the bytes to ImageNet's training split with ResNet-50 features (1,281,167 x 2048).
Timings depend on the machine: rerun on an idle one.

    python benchmarks/knn_bank_cost.py --num 100000 --dim 2048 --device cuda
    python benchmarks/knn_bank_cost.py --num 2000 --dim 64 --device cpu   # smoke run
"""
import argparse
import importlib.util
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import timed  # noqa: E402  (benchmarks/common.py, beside this script)
from timm_adv.attacks import select_guides  # noqa: E402
from timm_adv.models import BANK_DTYPES, DEFAULT_CHUNK, bank_bytes, build_feature_bank, knn_search  # noqa: E402

IMAGENET = (1_281_167, 2048)


def _gib(n: float) -> str:
    return f'{n / 2 ** 30:.3f} GiB'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num', type=int, default=100_000, help='bank entries N')
    parser.add_argument('--dim', type=int, default=2048, help='feature size D')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--dtypes', nargs='+', choices=tuple(BANK_DTYPES), default=list(BANK_DTYPES))
    parser.add_argument('--embed-batch', type=int, default=1024, help='loader batch while filling the bank')
    parser.add_argument('--batch-size', type=int, default=128, help='query batch B of the search and guides')
    parser.add_argument('--chunk-size', type=int, default=DEFAULT_CHUNK)
    parser.add_argument('--k', type=int, default=75)
    parser.add_argument('--guides', type=int, default=300)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(args.num, args.dim, generator=g)
    labels = torch.randint(0, args.num_classes, (args.num,), generator=g)
    loader = DataLoader(TensorDataset(features, labels), batch_size=args.embed_batch)
    query = nn.functional.normalize(torch.randn(args.batch_size, args.dim, generator=g), dim=1).to(device)
    reference = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    has_faiss = importlib.util.find_spec('faiss') is not None
    work = args.batch_size * min(args.chunk_size, args.num) * 4
    print(f'bank {args.num} x {args.dim}, {args.num_classes} classes, device {device}; search / guide batch '
          f'{args.batch_size}, chunk {args.chunk_size}: working memory {work / 2 ** 20:.1f} MiB '
          f'(dense: {args.batch_size * args.num * 4 / 2 ** 20:.1f} MiB)')
    for name in args.dtypes:
        dtype = BANK_DTYPES[name]
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        bank, refresh_s = timed(lambda: build_feature_bank(nn.Identity(), loader, args.num_classes, device=device,
                                                            dtype=dtype), device)
        peak = f'{(torch.cuda.max_memory_allocated() - base) / 2 ** 20:.1f} MiB' if device.type == 'cuda' else 'n/a'
        _, search_s = timed(lambda: knn_search(query, bank, args.k, chunk_size=args.chunk_size), device)
        _, guides_s = timed(lambda: select_guides(query, bank, reference, args.guides, chunk_size=args.chunk_size),
                             device)
        line = (f'{name:>9}: bytes formula {bank_bytes(args.num, args.dim, dtype):,} measured {bank.nbytes:,} '
                f'(peak while building {peak}); refresh {refresh_s:.3f}s')
        if has_faiss:
            _, index_s = timed(bank.faiss_index, device)
            line += f', faiss index {index_s:.3f}s'
        print(line + f'; search top-{args.k} {search_s * 1000:.1f} ms, guides m={args.guides} {guides_s * 1000:.1f} ms')
        del bank
    n, d = IMAGENET
    print(f'ImageNet on paper ({n:,} x {d}, bytes = N * (D * s + 40)):')
    for name in args.dtypes:
        dtype = BANK_DTYPES[name]
        print(f'{name:>9}: {bank_bytes(n, d, dtype):,} bytes = {_gib(bank_bytes(n, d, dtype))} per bank per GPU '
              f'(EMA: twice); search working memory {args.batch_size * min(args.chunk_size, n) * 4 / 2 ** 20:.1f} MiB '
              f'vs dense {args.batch_size * n * 4 / 2 ** 20:.0f} MiB')


if __name__ == '__main__':
    main()

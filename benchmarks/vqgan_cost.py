#!/usr/bin/env python3
"""Cost of one VQGAN reconstruction relative to a plain timm training step, and its bf16 accuracy.

In one process: the median time of a plain training step (forward, backward, SGD step) of ``--model``
at ``--batch-size`` x ``--img-size``, then of ``reconstruct`` on the same batch in fp32, bf16 autocast,
channels_last and both, each printed as a ratio to the plain step (DAT runs two reconstructions per
step). Multiply-accumulates of encoder, quantiser and decoder are counted with
``torch.utils.flop_counter`` on the meta device (no compute; convolutions and matrix products only).
The bf16 accuracy check reconstructs ``--precision-images`` real validation digits (bundled/mnist,
resized to ``--img-size``) in both precisions: max / mean pixel error and the fraction of equal codes.

    python benchmarks/vqgan_cost.py --vqgan output/vqgan/bundled_mnist --model resnet10t --batch-size 64
    python benchmarks/vqgan_cost.py --vqgan vq-f8 --img-size 224 --batch-size 1 --macs-only

``--memory`` prints, instead of timings, the peak memory per image of an encode and of a decode in fp32
and bf16 (CUDA: ``max_memory_allocated``; CPU: allocations replayed from torch's profiler), next to the
estimate ``--adv-dat-vqgan-chunk 0`` sizes chunks with, and the chunk that fits ``--budget-gb``:

    python benchmarks/vqgan_cost.py --vqgan vq-f8 --img-size 224 --batch-size 2 --memory --budget-gb 20
"""
import argparse
import os
import sys

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_adv.data import BundledMnist, spread_subset  # noqa: E402
from timm_adv.vqgan import (VQGAN_PRESETS, VQModel, chunk_for_budget, compare_precision, create_vqgan,  # noqa: E402
                            peak_memory_bytes, vqgan_activation_bytes)
from timm_adv.vqgan.fit import SquareImages  # noqa: E402
from common import add_common_args, median_time  # noqa: E402  (benchmarks/common.py, beside this script)


def _gmacs(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def vqgan_macs(config, batch: int, img_size: int):
    """GMACs per image of encoder (+ quant_conv), quantiser (distances to every code) and decoder."""
    with torch.device('meta'):
        model = VQModel(config)
        x = torch.empty(batch, 3, img_size, img_size)
        h = model.encode_latent(x)
        codes = torch.zeros(h.shape[0], h.shape[2], h.shape[3], dtype=torch.long)
        enc = _gmacs(lambda: model.encode_latent(x))
        quant = _gmacs(lambda: model.quantize_latent(h))
        dec = _gmacs(lambda: model.decode_latent(model.codes_to_latent(codes)))
    return enc / batch, quant / batch, dec / batch


def model_macs(model_name: str, num_classes: int, img_size: int) -> float:
    with torch.device('meta'):
        model = timm.create_model(model_name, num_classes=num_classes).eval()
        return _gmacs(lambda: model(torch.empty(1, 3, img_size, img_size)))


def memory_table(vq, batch: int, img_size: int, budget_gb: float, device: torch.device) -> None:
    """Peak bytes per image of encode and decode, fp32 and bf16, against the estimate that sizes DAT's chunks.

    Per image is the difference between a batch of ``batch`` and a batch of 1, divided by ``batch - 1``: what
    does not grow with the batch (bf16 copies of the weights) is left out.
    """
    torch.manual_seed(0)
    x = torch.rand(batch, 3, img_size, img_size, device=device)
    codes = vq.encode(x)
    estimate = vqgan_activation_bytes(vq.config, img_size, img_size)  # fp32-sized, as --adv-dat-vqgan-chunk 0
    print(f'| precision | encode MB/image | decode MB/image | chunk within {budget_gb:g} GB |')
    print('|---|---|---|---|')
    print(f'| estimate (fp32-sized; DAT\'s automatic chunk) | {estimate["encode"] / 2 ** 20:.0f} | '
          f'{estimate["decode"] / 2 ** 20:.0f} | {chunk_for_budget(estimate, budget_gb * 2 ** 30)} |')
    for bf16 in (False, True):
        vq.bf16 = bf16
        measured = {}
        for name, fn, inputs in (('encode', vq.encode, x), ('decode', vq.decode, codes)):
            one = peak_memory_bytes(lambda: fn(inputs[:1]), device)
            measured[name] = (peak_memory_bytes(lambda: fn(inputs), device) - one) / (batch - 1)
        print(f'| {"bf16" if bf16 else "fp32"} measured | {measured["encode"] / 2 ** 20:.0f} | '
              f'{measured["decode"] / 2 ** 20:.0f} | {chunk_for_budget(measured, budget_gb * 2 ** 30)} |')
    vq.bf16 = False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vqgan', default='output/vqgan/bundled_mnist',
                        help='what create_vqgan loads (default: the folder `python -m timm_adv.vqgan fit` writes); '
                             'a preset name builds random weights (costs do not depend on them)')
    add_common_args(parser, 'variant')
    parser.add_argument('--precision-images', type=int, default=500,
                        help='bundled/mnist validation images for the bf16 check (0: skip)')
    parser.add_argument('--macs-only', action='store_true', help='count MACs, time nothing')
    parser.add_argument('--memory', action='store_true', help='peak memory per image of encode / decode, no timing')
    parser.add_argument('--budget-gb', type=float, default=20.0, help='with --memory: the budget to size a chunk for')
    args = parser.parse_args()
    device = torch.device(args.device)
    preset = args.vqgan in VQGAN_PRESETS
    if not preset and not os.path.exists(args.vqgan.split(':', 1)[-1]) and not args.vqgan.startswith('hf-hub:'):
        parser.error(f'--vqgan {args.vqgan!r} does not exist: fit one first (python -m timm_adv.vqgan fit) or '
                     f'pass a preset ({", ".join(sorted(VQGAN_PRESETS))}).')
    vq = create_vqgan(args.vqgan, device, pretrained=not preset)
    if args.img_size % vq.downsample_factor:
        parser.error(f'--img-size {args.img_size} is not a multiple of the VQGAN factor {vq.downsample_factor}.')

    enc, quant, dec = vqgan_macs(vq.config, 2, args.img_size)
    plain_macs = model_macs(args.model, args.num_classes, args.img_size)
    grid = args.img_size // vq.downsample_factor
    print(f'vqgan={args.vqgan}{" (random weights)" if preset else ""} f={vq.downsample_factor} codes={vq.n_embed} '
          f'grid={grid}x{grid} model={args.model} img={args.img_size} batch={args.batch_size} device={device} '
          f'torch={torch.__version__} threads={torch.get_num_threads()}')
    print(f'GMACs per image: encoder {enc:.4g}, quantiser {quant:.4g}, decoder {dec:.4g}, reconstruction '
          f'{enc + quant + dec:.4g}; {args.model} forward {plain_macs:.4g} (reconstruction = '
          f'{(enc + quant + dec) / plain_macs:.1f} forwards)')
    if args.macs_only:
        return
    if args.memory:
        if args.batch_size < 2:
            parser.error('--memory needs --batch-size >= 2 (per image = batch minus one image).')
        memory_table(vq, args.batch_size, args.img_size, args.budget_gb, device)
        return

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def plain_step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain = median_time(plain_step, args.steps, args.warmup, device)
    print(f'plain training step: {plain * 1e3:.1f} ms')
    print('| reconstruction | ms | / plain step | DAT (2 per step) / plain step |')
    print('|---|---|---|---|')
    for bf16, channels_last in ((False, False), (True, False), (False, True), (True, True)):
        vq.bf16 = bf16
        vq.set_channels_last(channels_last)
        seconds = median_time(lambda: vq.reconstruct(x), args.steps, args.warmup, device)
        name = ' + '.join(n for n, on in (('bf16', bf16), ('channels_last', channels_last)) if on) or 'fp32'
        print(f'| {name} | {seconds * 1e3:.1f} | {seconds / plain:.2f} | {2 * seconds / plain:.2f} |')
    vq.bf16 = False
    vq.set_channels_last(False)

    if args.precision_images:
        val = BundledMnist('validation')
        val.transform = None
        images = SquareImages(spread_subset(val, args.precision_images), args.img_size)
        batch = torch.stack([images[i] for i in range(len(images))]).to(device)
        stats = compare_precision(vq, batch)
        print(f'bf16 vs fp32 on {stats["images"]} bundled/mnist validation images: max |pixel error| '
              f'{stats["max_abs_pixel_error"]:.4f}, mean {stats["mean_abs_pixel_error"]:.5f}, code agreement '
              f'{stats["code_agreement"]:.4f}, decoder alone (same codes) max error {stats["decode_max_abs_error"]:.4f}'
              f'{" (random weights)" if preset else ""}')


if __name__ == '__main__':
    main()

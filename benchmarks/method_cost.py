#!/usr/bin/env python3
"""Per-method training step cost relative to a plain timm step, measured in one process.

For every registered ``--adv-method`` (or those named with ``--methods``) the same model, batch and
optimiser run ``--steps`` timed steps after warm-up; the median is reported as a ratio to the plain
step (``none``). Beside it stands the method's ideal cost, ``train_steps * T_plain + attack_passes *
T_attack``, where ``T_attack`` is one forward + input-only backward pass, measured in the same run.
Peak memory is the CUDA allocator peak on GPU. On CPU it is the highest resident set size sampled
(every millisecond) while the method runs its steps, minus the resident size just before its first
step, each method in a fresh subprocess so that memory cached by another method does not hide its own.

    python benchmarks/method_cost.py --model resnet10t --img-size 32 --batch-size 64
"""
import argparse
import os
import subprocess
import sys
import threading

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_adv.cli import train as train_script  # noqa: E402  (the same argument defaults as a real run)
from timm_adv.attacks import PixelNormalizer, input_gradient  # noqa: E402
from timm_adv.data import DEFAULT_DATASET, apply_bundled_defaults  # noqa: E402
from timm_adv.tasks import create_task, get_method, list_methods  # noqa: E402
from common import add_common_args, ideal_time, median_time, task_update  # noqa: E402  (benchmarks/common.py, beside this script)


def _rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


class _RssPeak:
    """Samples the resident set size in a background thread; ``peak`` is the highest seen."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(method: str, bench_args, train_argv, device, x, y):
    # the plain reference step takes none of the measured methods' flags (train.py refuses them for 'none')
    args, _ = train_script.parse_args((train_argv if method != 'none' else []) + ['--adv-method', method])
    args.num_classes = bench_args.num_classes
    if not args.dataset and not args.data_dir:  # the kNN bank of contrastive / ssat embeds the bundled digits
        args.dataset = DEFAULT_DATASET
        apply_bundled_defaults(args)
    torch.manual_seed(0)
    model = timm.create_model(bench_args.model, num_classes=bench_args.num_classes)
    model = get_method(method).prepare_model(model, args).to(device)
    mean, std = model.pretrained_cfg.get('mean'), model.pretrained_cfg.get('std')
    task = create_task(model, torch.nn.CrossEntropyLoss(), args, mean=mean, std=std, device=device).to(device)
    task.on_epoch_start(0)
    task.train()
    optimizer = torch.optim.SGD(task.unwrapped_model.parameters(), lr=0.01, momentum=0.9)

    def step():
        task_update(task, optimizer, x, y)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        seconds = median_time(step, bench_args.steps, bench_args.warmup, device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        rss_before = _rss_mb()
        with _RssPeak() as rss:
            seconds = median_time(step, bench_args.steps, bench_args.warmup, device)
        peak = rss.peak - rss_before

    normalizer = PixelNormalizer(mean, std)
    x_pix = normalizer.to_pixel(x)
    delta = torch.zeros_like(x_pix)
    attack_pass = median_time(
        lambda: input_gradient(task.unwrapped_model, x_pix, delta, y, normalizer), bench_args.steps, 1, device)
    return seconds, peak, attack_pass, task.ideal_cost()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, 'method')
    parser.add_argument('--methods', nargs='+', default=None, help='methods to measure (default: all registered)')
    parser.add_argument('--memory-of', default=None, help=argparse.SUPPRESS)  # internal: one method's CPU memory
    parser.add_argument('train_args', nargs=argparse.REMAINDER,
                        help='extra train.py flags after "--" for every measured method (train.py refuses a flag a method does '
                             'not read), e.g. --methods pgd advprop -- --adv-steps 3 --adv-eps 4/255')
    bench_args = parser.parse_args()
    extra = [a for a in bench_args.train_args if a != '--']
    device = torch.device(bench_args.device)
    torch.manual_seed(0)
    x = torch.randn(bench_args.batch_size, 3, bench_args.img_size, bench_args.img_size, device=device)
    y = torch.randint(0, bench_args.num_classes, (bench_args.batch_size,), device=device)
    if bench_args.memory_of:
        print(measure(bench_args.memory_of, bench_args, extra, device, x, y)[1])
        return
    # DAT needs a VQGAN (--adv-dat-vqgan) and its cost has a third part: benchmarks/dat_cost.py measures it
    methods = bench_args.methods or [m for m in list_methods() if m != 'dat']
    if 'dat' in methods:
        parser.error('dat: use benchmarks/dat_cost.py, which also times the VQGAN passes.')
    if 'none' in methods:
        methods = ['none'] + [m for m in methods if m != 'none']
    else:
        methods = ['none'] + methods

    results = {m: measure(m, bench_args, extra, device, x, y) for m in methods}
    if device.type == 'cpu':
        for m in methods:
            cmd = [sys.executable, sys.argv[0], '--memory-of', m, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[m] = (results[m][0], float(out.strip().splitlines()[-1]), *results[m][2:])
    plain_time, plain_peak, plain_attack, _ = results['none']
    mem_unit = 'MiB CUDA peak' if device.type == 'cuda' else 'MiB RSS rise'
    print(f'model={bench_args.model} img={bench_args.img_size} batch={bench_args.batch_size} device={device} '
          f'torch={torch.__version__} threads={torch.get_num_threads()} extra={" ".join(extra) or "-"}')
    print(f'unit costs: plain step {plain_time * 1e3:.1f} ms, attack pass (fwd + input-only bwd) '
          f'{plain_attack * 1e3:.1f} ms = {plain_attack / plain_time:.2f} plain steps')
    print(f'| method | step / plain | ideal / plain | measured / ideal | memory ({mem_unit}) | memory / plain |')
    print('|---|---|---|---|---|---|')
    for m, (seconds, peak, _, cost) in results.items():
        ideal = ideal_time(cost, {'train_steps': plain_time, 'attack_passes': plain_attack})
        print(f'| {m} | {seconds / plain_time:.2f} | {ideal / plain_time:.2f} | {seconds / ideal:.2f} | {peak:.0f} | '
              f'{peak / max(plain_peak, 1e-9):.2f} |')


if __name__ == '__main__':
    main()

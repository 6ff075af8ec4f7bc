#!/usr/bin/env python3
"""Writes the model-zoo import fixtures of tests/test_zoo.py from the sources' own code.

For every supported registry entry it builds the source's own model, fills it with deterministic
weights (:func:`seeded_state_dict`, a function of each key and shape only, so the tests regenerate
the same weights from the pinned layout), saves them as the file the source's loader reads, loads
that file with the source's loader, and records the source's outputs on two small raw images
through the source's own eval transform. Pinned in ``tests/data/zoo/``:

* ``layouts.json.gz``: per entry, the weights file's keys with shape, dtype and kind (parameter,
  BatchNorm statistic, other buffer) and the values of small buffers (EasyRobust's normaliser);
* ``references.safetensors``: the two raw images (uint8) and each entry's source outputs;
* ``transforms.json``: per entry, the SHA-256 of the two images after the source's eval transform
  (``transforms`` step; every transform ends in ``ToTensor``, so the pixels are exact multiples of 1/255).

Two steps, each in the environment its source needs (current timm cannot live beside EasyRobust's
timm 0.5.4):

    # 1. RobustBench (pip install --no-deps robustbench==1.1.1 beside timm-adv); also writes the images
    python tools/zoo_fixtures.py robustbench
    # 1b. the eval transforms of every entry (robustbench's own; EasyRobust's benchmark.py transform)
    python tools/zoo_fixtures.py transforms
    # 2. EasyRobust: timm 0.5.4 (the version EasyRobust pins) in a separate folder, never beside current timm
    pip install --no-deps --target /tmp/timm054 timm==0.5.4
    PYTHONPATH=/tmp/timm054 python tools/zoo_fixtures.py easyrobust

``--entries`` limits a step to some names; ``--check`` also imports each entry with timm_adv (step 1
only) and prints the max |output difference| to the source; ``python tools/zoo_fixtures.py check`` does
that for every pinned entry (after step 2: the EasyRobust ones) from the fixtures alone, and with
``--folders`` through the whole import: weights file -> folder -> plain timm in a process without timm_adv.
"""
import argparse
import gzip
import json
import os
import sys
import tempfile
import time
import zlib
from typing import Dict, Mapping

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data', 'zoo')
LAYOUTS = os.path.join(DATA, 'layouts.json.gz')
REFERENCES = os.path.join(DATA, 'references.safetensors')
TRANSFORMS = os.path.join(DATA, 'transforms.json')
_SMALL_BUFFER = 64  # buffers up to this many values are pinned by value (input normalisers)

# EasyRobust entries (registry name -> timm 0.5.4 architecture, layout, interpolation of its benchmark run)
EASYROBUST = {
    **{f'advtrain_{a}_ep4': (a, 'easyrobust', 'bicubic') for a in (
        'swin_base_patch4_window7_224', 'swin_small_patch4_window7_224', 'vit_base_patch16_224', 'efficientnet_b3',
        'resnet101', 'vit_small_patch16_224', 'efficientnet_b2', 'resnest50d', 'vit_base_patch32_224',
        'efficientnet_b1', 'seresnet101', 'resnext50_32x4d', 'efficientnet_b0', 'seresnet50', 'densenet121',
        'vgg16')},
    'pgd_at_resnet50': ('resnet50', 'easyrobust', 'bicubic'),
    'dat_vit_base_patch16_224': ('vit_base_patch16_224', 'easyrobust', 'bicubic'),
    'dat_official_resnet50': ('resnet50', 'easyrobust', 'bicubic'),
    'dat_official_vit_base_patch16_224': ('vit_base_patch16_224', 'easyrobust', 'bicubic'),
    'dat_official_mae_vit_huge_patch14': ('mae_vit_huge_patch14', 'easyrobust', 'bicubic'),
    'advprop_resnet50': ('resnet50', 'easyrobust-advprop', 'bilinear'),
}


def _kind(name: str, param_names) -> str:
    if name in param_names:
        return 'param'
    if name.endswith(('running_mean', 'running_var')):
        return 'stat'
    return 'buffer'


def layout_of(state_dict: Mapping[str, torch.Tensor], param_names) -> Dict:
    """Keys, shapes, dtypes and kinds of a weights file (small buffers by value)."""
    keys, fixed = {}, {}
    for k, v in state_dict.items():
        kind = 'param' if k in param_names else _kind(k, ())
        keys[k] = [list(v.shape), str(v.dtype).replace('torch.', ''), kind]
        if kind == 'buffer' and v.numel() <= _SMALL_BUFFER and v.is_floating_point():
            fixed[k] = v.flatten().tolist()
    return dict(keys=keys, fixed=fixed)


def seeded_tensor(key: str, shape, dtype: str, kind: str, seed: int = 0) -> torch.Tensor:
    """Deterministic values for one key: a function of the key, shape and seed only."""
    dtype = getattr(torch, dtype)
    if kind == 'buffer' or not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed((zlib.crc32(key.encode()) + seed) % (2 ** 31))
    if kind == 'stat':
        if key.endswith('running_var'):
            return (0.5 + torch.rand(shape, generator=g)).to(dtype)
        return (0.1 * torch.randn(shape, generator=g)).to(dtype)
    if len(shape) >= 2:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        return (torch.randn(shape, generator=g) * fan_in ** -0.5).to(dtype)
    if key.endswith('weight'):  # norm scales around 1
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return (0.1 * torch.randn(shape, generator=g)).to(dtype)


def seeded_state_dict(layout: Mapping, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The deterministic weights file of a pinned layout (small buffers at their pinned values)."""
    out = {}
    for key, (shape, dtype, kind) in layout['keys'].items():
        if key in layout.get('fixed', {}):
            out[key] = torch.tensor(layout['fixed'][key], dtype=getattr(torch, dtype)).reshape(shape)
        else:
            out[key] = seeded_tensor(key, shape, dtype, kind, seed)
    return out


def source_weights(model: nn.Module, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The model's state dict with parameters and BatchNorm statistics replaced by the seeded values."""
    params = {k for k, _ in model.named_parameters()}
    return {k: seeded_tensor(k, list(v.shape), str(v.dtype).replace('torch.', ''), _kind(k, params), seed)
            if _kind(k, params) != 'buffer' else v.clone() for k, v in model.state_dict().items()}


def _read_references() -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(REFERENCES) if os.path.isfile(REFERENCES) else {}


def _read_layouts() -> Dict:
    if not os.path.isfile(LAYOUTS):
        return {}
    with gzip.open(LAYOUTS, 'rt') as f:
        return json.load(f)


def _write(layouts: Dict, references: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    os.makedirs(DATA, exist_ok=True)
    with gzip.open(LAYOUTS, 'wt') as f:
        json.dump(dict(sorted(layouts.items())), f, separators=(',', ':'))
    save_file({k: v.contiguous() for k, v in sorted(references.items())}, REFERENCES)


def image_digest(tensors) -> str:
    """SHA-256 of transformed images in [0, 1] (``ToTensor`` output), as the bytes of their 8-bit pixel values."""
    import hashlib
    digest = hashlib.sha256()
    for t in tensors:
        digest.update((t * 255).round().to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def easyrobust_transform(interpolation: str):
    """EasyRobust benchmarks/benchmark.py: Resize(int(224 / 0.875)) + CenterCrop(224) + ToTensor (the normaliser
    is inside its model); ``--interpolation`` 3 is bicubic (its default), 2 bilinear."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode(interpolation)),
        transforms.CenterCrop(224), transforms.ToTensor()])


def transforms_step() -> None:
    sys.path.insert(0, ROOT)
    from timm_adv.hub.zoo import ZOO
    from timm_adv.hub.zoo_import import robustbench_transform
    images = fixture_images(_read_references())
    digests = {}
    for entry in ZOO.values():
        transform = robustbench_transform(entry) if entry.source == 'robustbench' else \
            easyrobust_transform(EASYROBUST[entry.name][2])
        digests[entry.spec] = image_digest([transform(img) for img in images])
        print(entry.spec, transform, digests[entry.spec][:12], flush=True)
    with open(TRANSFORMS, 'w') as f:
        json.dump(dict(sorted(digests.items())), f, indent=1)


def fixture_images(references: Mapping[str, torch.Tensor]):
    """The pinned raw images as PIL images."""
    from PIL import Image
    return [Image.fromarray(references[f'image.{i}'].numpy()) for i in range(2)]


@torch.no_grad()
def robustbench_step(names, check: bool) -> None:
    sys.path.insert(0, ROOT)
    from timm_adv.hub.zoo import ZOO
    from timm_adv.hub.zoo_import import import_robustbench, robustbench_model, robustbench_transform, sample_images
    import_robustbench()
    from robustbench.model_zoo.enums import ThreatModel
    from robustbench.model_zoo.imagenet import imagenet_models
    import timm
    layouts, references = _read_layouts(), _read_references()
    images = sample_images()
    for i, img in enumerate(images):
        references[f'image.{i}'] = torch.from_numpy(__import__('numpy').asarray(img).copy())
    for entry in ZOO.values():
        if entry.source != 'robustbench' or (names and entry.name not in names):
            continue
        start = time.time()
        timm_name = f'{entry.name.lower().replace("-", "_")}_imagenet_linf'
        if timm.is_model(timm_name):  # robustbench's timm-registered entries (XCiT)
            inner = timm.create_model(timm_name)
        else:
            source = imagenet_models[ThreatModel.Linf][entry.name]['model']()
            inner = source.model if entry.layout == 'robustbench-normalized' else source
        weights = source_weights(inner)
        params = {k for k, _ in inner.named_parameters()}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f'{entry.name}.pt')
            torch.save(weights, path)
            model = robustbench_model(entry, path)
            transform = robustbench_transform(entry)
            out = model(torch.stack([transform(img) for img in images]))
            line = f'{entry.spec}: source outputs {tuple(out.shape)}'
            if check:
                line += f', {_check(entry, path, images, out)}'
        layouts[entry.spec] = layout_of(weights, params)
        references[entry.spec] = out.float()
        print(f'{line} ({time.time() - start:.0f} s)', flush=True)
        del model, inner, weights
    _write(layouts, references)


def plain_timm_outputs(folder: str, out_path: str) -> torch.Tensor:
    """Outputs of ``local-dir:folder`` on the pinned images, computed in a fresh process that imports timm (its
    eval transform from the folder's ``pretrained_cfg``) and never timm_adv."""
    import subprocess
    code = ('import sys, torch, timm\n'
            'from timm.data import create_transform, resolve_data_config\n'
            'from safetensors.torch import load_file\n'
            'from PIL import Image\n'
            f'refs = load_file({REFERENCES!r})\n'
            'images = [Image.fromarray(refs[f"image.{i}"].numpy()) for i in range(2)]\n'
            f'model = timm.create_model("local-dir:{os.path.abspath(folder)}", pretrained=True).eval()\n'
            'transform = create_transform(**resolve_data_config({}, model=model))\n'
            'with torch.no_grad():\n'
            '    logits = model(torch.stack([transform(img) for img in images]))\n'
            'assert not any(name.startswith("timm_adv") for name in sys.modules), "timm_adv was imported"\n'
            f'torch.save(logits, {out_path!r})\n')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    subprocess.run([sys.executable, '-c', code], check=True, cwd='/', env=env, timeout=1200)
    return torch.load(out_path, weights_only=True)


def source_file(spec: str, layout: Mapping, path: str) -> str:
    """The pinned entry's weights file, nested and prefixed the way the sources' loaders accept."""
    weights = seeded_state_dict(layout)
    if spec.startswith('robustbench:'):
        weights = {'state_dict': {f'module.{k}': v for k, v in weights.items()}}
    torch.save(weights, path)
    return path


@torch.no_grad()
def check_step(names, folders: bool) -> None:
    """Regenerates each pinned entry's weights, imports them with timm_adv and prints the max |difference| to the
    pinned source outputs (every entry; the test suite runs one per family). With ``folders``: the full
    ``python -m timm_adv.hub import`` to a folder from the weights file, loaded by plain timm in a fresh process."""
    sys.path.insert(0, ROOT)
    from timm_adv.hub.zoo import ZOO
    from timm_adv.hub.zoo_import import (create_timm_model, entry_data_config, import_zoo_model, source_state_dict,
                                         timm_outputs)
    layouts, references = _read_layouts(), _read_references()
    images = fixture_images(references)
    for spec, layout in layouts.items():
        if names and spec.split(':', 1)[1] not in names:
            continue
        entry, reference, start = ZOO[spec], references[spec], time.time()
        if folders:
            with tempfile.TemporaryDirectory() as tmp:
                result = import_zoo_model(spec, os.path.join(tmp, 'hub'), check_source=False,
                                          weights=source_file(spec, layout, os.path.join(tmp, 'weights.pt')))
                out = plain_timm_outputs(result['folder'], os.path.join(tmp, 'out.pt'))
        else:
            imported = source_state_dict(seeded_state_dict(layout), entry)
            out = timm_outputs(create_timm_model(entry, imported), images, entry_data_config(entry, imported))
        print(f'{spec} -> {entry.architecture}{" (folder, plain timm process)" if folders else ""}: max |diff| '
              f'{float((out - reference).abs().max()):.3g} (max |logit| {float(reference.abs().max()):.3g}, '
              f'{time.time() - start:.0f} s)', flush=True)


def _check(entry, path, images, reference) -> str:
    """Imports with timm_adv (conversion + timm eval transform, no folder) and compares with the source."""
    from timm_adv.hub.zoo_import import (create_timm_model, entry_data_config, source_state_dict, timm_outputs)
    from timm_adv.utils import read_checkpoint
    imported = source_state_dict(read_checkpoint(path, '--weights'), entry)
    model = create_timm_model(entry, imported)
    diff = float((timm_outputs(model, images, entry_data_config(entry, imported)) - reference).abs().max())
    return f'timm_adv import max |diff| {diff:.3g} (max |logit| {float(reference.abs().max()):.3g})'


class _Normalizer(nn.Module):
    """EasyRobust's input normaliser (buffers 'mean', 'std' of shape [3]): (x - mean) / std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean))
        self.register_buffer('std', torch.tensor(std))

    def forward(self, x):
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


def _mae_vit_huge() -> nn.Module:
    """EasyRobust's ``mae_vit_huge_patch14`` on timm 0.5.4: the MAE fine-tuning ViT-H/14 (LayerNorm eps 1e-6),
    classifying the mean of the patch tokens after ``fc_norm``, without the final norm."""
    from functools import partial
    from timm.models.vision_transformer import VisionTransformer

    class MAEViT(VisionTransformer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fc_norm = kwargs['norm_layer'](kwargs['embed_dim'])
            del self.norm

        def forward_features(self, x):
            x = self.patch_embed(x)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = self.pos_drop(x + self.pos_embed)
            x = self.blocks(x)
            return self.fc_norm(x[:, 1:].mean(dim=1))

    return MAEViT(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))


@torch.no_grad()
def easyrobust_step(names) -> None:
    import timm
    if not timm.__version__.startswith('0.5.'):
        raise SystemExit(f'easyrobust step needs timm 0.5.4 (EasyRobust pins it), found {timm.__version__}; see --help.')
    layouts, references = _read_layouts(), _read_references()
    if 'image.0' not in references:
        raise SystemExit('run the robustbench step first (it writes the images)')
    images = fixture_images(references)
    for name, (arch, layout, interpolation) in EASYROBUST.items():
        if names and name not in names:
            continue
        start = time.time()
        model = _mae_vit_huge() if arch == 'mae_vit_huge_patch14' else timm.create_model(arch, num_classes=1000)
        # benchmarks/benchmark.py: nn.Sequential(NormalizeByChannelMeanStd(mean, std), model); the checkpoint's own
        # '0.mean'/'0.std' override its ImageNet defaults (DAT trains with --mean 0 0 0 --std 1 1 1)
        mean, std = ((0.0,) * 3, (1.0,) * 3) if name.startswith('dat_') else (
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        wrapped = nn.Sequential(_Normalizer(mean, std), model).eval()
        params = {k for k, _ in wrapped.named_parameters()}
        weights = source_weights(wrapped)
        wrapped.load_state_dict(weights)
        if layout == 'easyrobust-advprop':  # SwitchableBatchNorm2d: every BN also holds 'bn_adv' (training only)
            for key in [k for k in weights if k.endswith('running_var')]:
                bn = key[:-len('running_var')]
                for leaf in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                    adv = f'{bn}bn_adv.{leaf}'
                    weights[adv] = seeded_tensor(adv, list(weights[bn + leaf].shape),
                                                 str(weights[bn + leaf].dtype).replace('torch.', ''),
                                                 'param' if leaf in ('weight', 'bias') else 'stat')
                    if leaf in ('weight', 'bias'):
                        params.add(adv)
        transform = easyrobust_transform(interpolation)
        out = wrapped(torch.stack([transform(img) for img in images]))
        layouts[f'easyrobust:{name}'] = layout_of(weights, params)
        references[f'easyrobust:{name}'] = out.float()
        print(f'easyrobust:{name} ({arch}, timm {timm.__version__}): outputs {tuple(out.shape)} '
              f'({time.time() - start:.0f} s)', flush=True)
    _write(layouts, references)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('source', choices=('robustbench', 'transforms', 'easyrobust', 'check'))
    parser.add_argument('--entries', nargs='*', default=None, help='only these entry names')
    parser.add_argument('--check', action='store_true', help='robustbench: also import with timm_adv and compare')
    parser.add_argument('--folders', action='store_true',
                        help='check: import to a folder and load it with plain timm in a fresh process')
    args = parser.parse_args()
    if args.source == 'robustbench':
        robustbench_step(args.entries, args.check)
    elif args.source == 'transforms':
        transforms_step()
    elif args.source == 'check':
        check_step(args.entries, args.folders)
    else:
        easyrobust_step(args.entries)


if __name__ == '__main__':
    main()

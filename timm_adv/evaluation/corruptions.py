"""Corruption robustness: ImageNet-C style folders with mCE, or corruptions generated on the fly.

mCE follows Hendrycks & Dietterich (ICLR 2019): for each corruption c, CE_c is the top-1 error
averaged over severities 1-5 divided by AlexNet's averaged error on c; mCE is the mean of CE_c over
the 15 benchmark corruptions (reported in percent).

Generated corruptions use the ``imagecorruptions`` package. They are *regenerated*, not the
released files: most match Hendrycks' code, but elastic_transform is a different algorithm and
impulse_noise cannot be seeded, and the severity parameters are those for 224 px images, so on
small images (e.g. 32 px) the result is not CIFAR-10-C. Reports say so.
"""
import logging
import os
import types
import warnings
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from timm_adv.data import spread_subset
from timm_adv.utils import ProgressLog
from .accuracy import evaluate_accuracy, evaluate_folder

__all__ = ['IMAGENET_C_CORRUPTIONS', 'ALEXNET_ERRORS', 'SEVERITIES', 'CorruptionFolderError', 'compute_mce',
           'scan_corruption_folder', 'folder_class_map', 'CorruptedDataset', 'import_imagecorruptions',
           'evaluate_corruption_folder', 'evaluate_generated_corruptions', 'GENERATED_NOTE', 'FOLDER_PROTOCOLS',
           'folder_transform']

_logger = logging.getLogger(__name__)

#: The 15 benchmark corruptions of ImageNet-C, in the paper's order.
IMAGENET_C_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression')

#: AlexNet top-1 error per corruption, averaged over severities 1-5 (the mCE normaliser).
ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640, 'defocus_blur': 0.819880,
    'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360, 'snow': 0.866816, 'frost': 0.826572,
    'fog': 0.819324, 'brightness': 0.564592, 'contrast': 0.853204, 'elastic_transform': 0.646056,
    'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}

SEVERITIES = (1, 2, 3, 4, 5)

GENERATED_NOTE = (
    'Corruptions regenerated on the fly with imagecorruptions (not the released ImageNet-C files): '
    'elastic_transform uses a different algorithm and impulse_noise is not seedable; severity parameters '
    'are those for 224 px ImageNet images, so on small images this is not CIFAR-10-C.')

#: How ImageNet-C folder images become model input: ``hendrycks`` is the reference script
#: (hendrycks/robustness ``ImageNet-C/test.py``: the 224 px images centre-cropped, no resize), behind
#: the AlexNet constants and every published mCE; ``model`` is the model's own eval transform.
FOLDER_PROTOCOLS = {
    'hendrycks': 'centre crop to the input size, no resize (hendrycks/robustness ImageNet-C/test.py)',
    'model': "the model's eval transform (resize, crop_pct centre crop); not comparable with published mCE",
}

INSTALL_HINT = "pip install 'timm-adv[eval]' (or: pip install imagecorruptions 'setuptools<82')"


class CorruptionFolderError(ValueError):
    """An ImageNet-C style folder that lacks corruptions or severities."""


def compute_mce(top1: Mapping[str, Mapping[int, float]], baseline: Mapping[str, float] = ALEXNET_ERRORS,
                corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
                severities: Sequence[int] = SEVERITIES) -> Dict:
    """Corruption errors normalised by AlexNet, and their mean (mCE), from top-1 accuracies in percent.

    Args:
        top1: ``{corruption: {severity: top-1 accuracy in percent}}``.
        baseline: Averaged baseline error (fraction) per corruption.
        corruptions: Corruptions that must all be present.
        severities: Severities that must all be present for each corruption.

    Returns:
        Dict with ``ce`` (percent per corruption) and ``mce`` (percent).

    Raises:
        ValueError: A corruption or severity is missing, or has no baseline.

    Example:
        >>> compute_mce({c: {s: 60.0 for s in SEVERITIES} for c in IMAGENET_C_CORRUPTIONS})['mce']
        51.7...
    """
    missing = [f'{c}/{s}' for c in corruptions for s in severities if s not in top1.get(c, {})]
    if missing:
        raise ValueError(f'mCE needs every corruption at every severity; missing: {", ".join(missing[:10])}'
                         f'{" ..." if len(missing) > 10 else ""}.')
    no_baseline = [c for c in corruptions if c not in baseline]
    if no_baseline:
        raise ValueError(f'No AlexNet baseline error for {no_baseline}; mCE is defined on the 15 ImageNet-C corruptions.')
    ce = {}
    for c in corruptions:
        mean_error = sum(1.0 - top1[c][s] / 100.0 for s in severities) / len(severities)
        ce[c] = 100.0 * mean_error / baseline[c]
    return dict(ce=ce, mce=sum(ce.values()) / len(ce))


def scan_corruption_folder(root: str, corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
                           severities: Sequence[int] = SEVERITIES) -> Dict[str, Dict[int, str]]:
    """Paths ``root/<corruption>/<severity>`` of an ImageNet-C style folder, all checked to exist.

    Raises:
        CorruptionFolderError: Listing every missing corruption or severity and the fix.
    """
    if not os.path.isdir(root):
        raise CorruptionFolderError(f'--corruption-dir {root!r} is not a folder; point it at an ImageNet-C style '
                                    f'folder laid out as <corruption>/<severity 1-5>/<class>/<image>.')
    paths, missing = {}, []
    for c in corruptions:
        if not os.path.isdir(os.path.join(root, c)):
            missing.append(c)
            continue
        paths[c] = {}
        for s in severities:
            path = os.path.join(root, c, str(s))
            if os.path.isdir(path) and any(os.scandir(path)):
                paths[c][s] = path
            else:
                missing.append(f'{c}/{s}')
    if missing:
        raise CorruptionFolderError(
            f'--corruption-dir {root!r} lacks {len(missing)} corruption(s)/severities: {", ".join(missing[:12])}'
            f'{" ..." if len(missing) > 12 else ""}. Download or extract all of them, or evaluate a subset with '
            f'--corruptions / --severities (mCE is only reported for the full 15 x 5 set).')
    return paths


def folder_class_map(class_dirs: Iterable[str], label_names: Optional[Sequence[str]] = None,
                     num_classes: Optional[int] = None) -> Optional[Dict[str, int]]:
    """Maps class folder names to the model's output indices.

    Folder names found in the model's ``label_names`` use those indices; WordNet ids with a
    1000-class model use the ImageNet-1k order; otherwise None (sorted folder order).
    """
    class_dirs = sorted(class_dirs)
    if label_names:
        index = {str(name): i for i, name in enumerate(label_names)}
        if all(d in index for d in class_dirs):
            return {d: index[d] for d in class_dirs}
    if num_classes == 1000 and class_dirs and all(d.startswith('n') and d[1:].isdigit() for d in class_dirs):
        from timm.data import ImageNetInfo
        index = {name: i for i, name in enumerate(ImageNetInfo('imagenet-1k').label_names())}
        if all(d in index for d in class_dirs):
            return {d: index[d] for d in class_dirs}
    return None


def _numpy_proxy():
    """numpy with the ``float_`` alias that NumPy 2 removed (imagecorruptions' fog still uses it)."""
    proxy = types.ModuleType('numpy')
    proxy.__getattr__ = lambda name: np.float64 if name == 'float_' else getattr(np, name)
    return proxy


def import_imagecorruptions():
    """``imagecorruptions.corrupt`` working on NumPy 2 and current scikit-image.

    The package (last released 2020) calls ``np.float_`` and skimage's removed ``multichannel``
    argument; both are bridged inside its own module only.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # pkg_resources deprecation from the package import
            import imagecorruptions
            from imagecorruptions import corruptions as module
    except ImportError as e:
        raise ImportError(f'Generated corruptions need imagecorruptions ({e}): {INSTALL_HINT}.') from None
    if not getattr(module, '_timm_adv_bridged', False):
        gaussian = module.gaussian

        def gaussian_bridge(image, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault('channel_axis', -1)
            return gaussian(image, *args, **kwargs)

        module.gaussian = gaussian_bridge
        module.np = _numpy_proxy()
        module._timm_adv_bridged = True
    return imagecorruptions.corrupt


class CorruptedDataset(torch.utils.data.Dataset):
    """A dataset's images resized/cropped to the model input, corrupted, then normalised.

    Corruptions are applied at the resolution the model sees, as ImageNet-C applies them to
    224 px crops. Each image has its own fixed seed, so runs are repeatable (except impulse_noise).

    Args:
        dataset: Yields ``(PIL image, target)`` (no transform set).
        corruption: imagecorruptions name, e.g. ``gaussian_noise``.
        severity: 1-5.
        data_config: timm data config (input_size, interpolation, crop_pct, crop_mode, mean, std).
        seed: Base seed.

    Example:
        >>> ds = CorruptedDataset(BundledMnist('validation'), 'fog', 3, data_config)
    """

    def __init__(self, dataset, corruption: str, severity: int, data_config: Mapping, seed: int = 0):
        self.corrupt = import_imagecorruptions()
        self.dataset = dataset
        self.corruption = corruption
        self.severity = int(severity)
        self.seed = seed
        self.geometry = create_transform(
            data_config['input_size'], is_training=False, use_prefetcher=True,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
            crop_mode=data_config.get('crop_mode', 'center'))
        self.mean = torch.tensor(data_config['mean']).view(-1, 1, 1)
        self.std = torch.tensor(data_config['std']).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        if not isinstance(img, Image.Image):
            raise TypeError('CorruptedDataset needs a dataset yielding PIL images (no transform set).')
        pixels = torch.as_tensor(np.asarray(self.geometry(img.convert('RGB')))).permute(1, 2, 0).numpy()
        np.random.seed((self.seed * 1_000_003 + index) % 2 ** 32)
        corrupted = self.corrupt(np.ascontiguousarray(pixels), corruption_name=self.corruption,
                                 severity=self.severity)
        corrupted = np.clip(np.asarray(corrupted, dtype=np.float32), 0, 255).round()
        x = torch.from_numpy(corrupted).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std, target


def folder_transform(data_config: Mapping, protocol: str = 'hendrycks') -> Optional[Callable]:
    """The image transform of an ImageNet-C folder under ``protocol`` (None: the model's eval transform).

    Example:
        >>> folder_transform(dict(input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD))
        Compose(CenterCrop(size=(224, 224)), ToTensor(), Normalize(...))
    """
    if protocol not in FOLDER_PROTOCOLS:
        raise ValueError(f'--corruption-protocol must be one of {", ".join(FOLDER_PROTOCOLS)}, got {protocol!r}.')
    if protocol == 'model':
        return None
    return transforms.Compose([
        transforms.CenterCrop(tuple(data_config['input_size'][-2:])),
        transforms.ToTensor(),
        transforms.Normalize(data_config['mean'], data_config['std']),
    ])


def _accuracy(model, dataset, batch_size, workers, device, label: str, **eval_kwargs) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return evaluate_accuracy(model, loader, device=device, log_prefix=label, **eval_kwargs)['top1']


def evaluate_generated_corruptions(
        model: nn.Module,
        dataset,
        data_config: Mapping,
        corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        num_samples: Optional[int] = None,
        batch_size: int = 64,
        workers: int = 0,
        device: Optional[torch.device] = None,
        seed: int = 0,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
) -> Dict:
    """Top-1 under corruptions generated with imagecorruptions, per corruption and severity.

    Args:
        model: Model taking normalised input.
        dataset: Yields ``(PIL image, target)``; ``num_samples`` evenly spaced images are used.
        data_config: timm data config of the model.
        corruptions: imagecorruptions names (its 15 benchmark ones by default, 4 extra exist).
        severities: Severities to evaluate.
        num_samples: Use only N evenly spaced images.
        batch_size: Batch size.
        workers: DataLoader workers.
        device: Device.
        seed: Base seed of the corruptions.
        amp_autocast: Autocast context factory.
        channels_last: Convert inputs to channels-last memory format.

    Returns:
        Report dict (``source='generated'``, ``top1`` per corruption and severity, ``mean_top1``,
        and ``note``; ``mce`` only for 1000-class ImageNet models with all 15 x 5).

    Example:
        >>> evaluate_generated_corruptions(model, BundledMnist('validation'), data_config, ['fog'], [1, 3, 5])
    """
    import_imagecorruptions()
    from imagecorruptions import get_corruption_names
    known = get_corruption_names('all')
    unknown = [c for c in corruptions if c not in known]
    if unknown:
        raise ValueError(f'--corruptions-generated: unknown corruption(s) {unknown}; choose from {", ".join(known)}.')
    _check_severities(severities, '--severities')
    if num_samples is not None:
        dataset = spread_subset(dataset, num_samples)
    top1: Dict[str, Dict[int, float]] = {}
    progress = _settings_progress('Generated corruptions', corruptions, severities)
    for c in corruptions:
        top1[c] = {}
        for s in severities:
            top1[c][s] = _accuracy(model, CorruptedDataset(dataset, c, s, data_config, seed=seed), batch_size,
                                   workers, device, f'{c}-{s}', amp_autocast=amp_autocast,
                                   channels_last=channels_last)
            progress.update(detail=f'{c} severity {s}: top-1 {top1[c][s]:.2f}%')
    report = _summarise(top1, source='generated', samples=len(dataset))
    report['note'] = GENERATED_NOTE
    report['package'] = f'imagecorruptions {_version("imagecorruptions")}'
    if getattr(model, 'num_classes', None) != 1000:
        report.pop('mce', None)
        report.pop('ce', None)
    return report


def evaluate_corruption_folder(
        model: nn.Module,
        root: str,
        data_config: Mapping,
        corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        label_names: Optional[Sequence[str]] = None,
        num_samples: Optional[int] = None,
        batch_size: int = 64,
        workers: int = 0,
        device: Optional[torch.device] = None,
        protocol: str = 'hendrycks',
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
) -> Dict:
    """Top-1 per corruption and severity on an ImageNet-C style folder, with mCE when complete.

    Args:
        model: Model taking normalised input.
        root: Folder laid out as ``<corruption>/<severity>/<class>/<image>``.
        data_config: timm data config (input size, mean / std; interpolation and crop_pct only
            with ``protocol='model'``).
        corruptions: Corruptions to evaluate; mCE is reported only for the 15 benchmark ones.
        severities: Severities to evaluate.
        label_names: The model's class names, to map class folders to output indices.
        num_samples: Use only N evenly spaced images of each corruption/severity.
        batch_size: Batch size.
        workers: DataLoader workers.
        device: Device.
        protocol: ``hendrycks`` (the reference script: ImageNet-C's 224 px images centre-cropped,
            no resize, the protocol of the AlexNet constants and published mCE) or ``model`` (the
            model's eval transform, resize then ``crop_pct`` crop). The report records it.
        amp_autocast: Autocast context factory.
        channels_last: Convert inputs to channels-last memory format.

    Raises:
        CorruptionFolderError: Missing corruptions or severities (checked before any evaluation).

    Example:
        >>> evaluate_corruption_folder(model, '/data/imagenet-c', data_config)['mce']
    """
    _check_severities(severities, '--severities')
    transform = folder_transform(data_config, protocol)
    if protocol == 'hendrycks' and tuple(data_config['input_size'][-2:]) != (224, 224):
        _logger.warning(f'ImageNet-C protocol: the reference script crops 224 px; this model takes '
                        f'{data_config["input_size"][-2:]}, so images are centre-cropped (or padded) to that size.')
    paths = scan_corruption_folder(root, corruptions, severities)
    top1: Dict[str, Dict[int, float]] = {}
    samples = 0
    progress = _settings_progress('ImageNet-C folder', corruptions, severities)
    for c in corruptions:
        top1[c] = {}
        for s in severities:
            path = paths[c][s]
            class_map = folder_class_map(
                [d.name for d in os.scandir(path) if d.is_dir()], label_names, getattr(model, 'num_classes', None))
            result = evaluate_folder(model, path, data_config, class_map=class_map, num_samples=num_samples,
                                     batch_size=batch_size, workers=workers, device=device, log_prefix=f'{c}-{s}',
                                     amp_autocast=amp_autocast, channels_last=channels_last, transform=transform)
            top1[c][s] = result['top1']
            samples = max(samples, result['samples'])
            progress.update(detail=f'{c} severity {s}: top-1 {top1[c][s]:.2f}% ({result["samples"]} images)')
    report = _summarise(top1, source='folder', samples=samples)
    report['root'] = root
    report['protocol'] = protocol
    report['transform'] = FOLDER_PROTOCOLS[protocol]
    return report


def _settings_progress(desc: str, corruptions: Sequence[str], severities: Sequence[int]) -> ProgressLog:
    """A line after each (corruption, severity) setting, with the time the rest of the sweep should take."""
    return ProgressLog(len(corruptions) * len(severities), desc, unit='settings', interval=0, logger=_logger)


def _check_severities(severities: Sequence[int], flag: str) -> None:
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ValueError(f'{flag} must be values in 1-5, got {list(severities)}.')


def _summarise(top1: Dict[str, Dict[int, float]], source: str, samples: int) -> Dict:
    accuracies = [a for by_severity in top1.values() for a in by_severity.values()]
    report = dict(source=source, samples=samples, top1={c: dict(v) for c, v in top1.items()},
                  mean_top1=sum(accuracies) / len(accuracies))
    if set(IMAGENET_C_CORRUPTIONS) <= set(top1) and all(set(SEVERITIES) <= set(top1[c]) for c in IMAGENET_C_CORRUPTIONS):
        report.update(compute_mce(top1))
    return report


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return 'unknown'

"""Import published robust models (RobustBench, EasyRobust) as plain timm Hub folders.

The source's weights (fetched through its own loader, or a file given offline) are mapped to the
timm architecture of the registry entry: wrapper prefixes and training-only keys are removed, the
normalisation the source applies inside its model moves into ``pretrained_cfg`` together with the
source's resize / crop / interpolation, and timm's own checkpoint filter of the architecture
converts older timm layouts (e.g. EasyRobust's timm 0.5.4 Swin) while loading strictly. The
folder is written with :func:`timm_adv.hub.export_from_task` (reloaded in plain timm and compared)
and, when the source package is installed, the reloaded model is also compared with the source's
own model on raw images, each side with its own eval transform.

Example:
    >>> result = import_zoo_model('robustbench:Salman2020Do_50_2', 'hub/wrn50_2', weights='Salman2020Do_50_2.pt')
    >>> result['max_abs_diff'], result['source_max_abs_diff']
"""
import logging
import os
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from timm_adv.utils import checkpoint_state_dict, read_checkpoint

from .export import ExportError, export_from_task, label_names_for
from .zoo import LAYOUTS, ZooEntry, get_zoo_entry

__all__ = ['ImportedWeights', 'source_state_dict', 'create_timm_model', 'import_robustbench', 'robustbench_model',
           'robustbench_transform', 'fetch_weights', 'sample_images', 'entry_data_config', 'timm_outputs',
           'compare_with_source', 'import_zoo_model']

_logger = logging.getLogger(__name__)

#: Input normaliser buffers of the source wrappers (RobustBench ImageNormalizer, EasyRobust NormalizeByChannelMeanStd).
_NORMALIZERS = {'robustbench': ('normalize.mean', 'normalize.std'), 'easyrobust': ('0.mean', '0.std')}


class ImportedWeights:
    """The timm-layout state dict of an entry, with the input normalisation the source applied."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], mean: Tuple[float, ...], std: Tuple[float, ...],
                 dropped: Sequence[str] = ()):
        self.state_dict = state_dict
        self.mean = mean
        self.std = std
        self.dropped = list(dropped)


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _normaliser(state_dict: Dict[str, torch.Tensor], keys: Tuple[str, str], entry: ZooEntry):
    """Pops the wrapper's normaliser buffers; their values win over the registry's (the source loads them)."""
    if keys[0] in state_dict and keys[1] in state_dict:
        # the shortest decimals of the stored float32 values (0.485, not 0.48500001430511475): same float32
        return tuple(tuple(float(str(np.float32(v))) for v in state_dict.pop(key).flatten().tolist()) for key in keys)
    return tuple(entry.transform.mean), tuple(entry.transform.std)


def source_state_dict(checkpoint: Any, entry: ZooEntry) -> ImportedWeights:
    """Maps what the source's loader reads to the state dict of the model inside its wrapper.

    RobustBench: the file may nest the weights under ``'state_dict'`` and prefix them with
    ``module.`` / ``model.`` (its loader strips both); a model it returns holds ``normalize.*`` and
    ``model.*``. EasyRobust: ``'0.mean'``/``'0.std'`` then ``'1.<keys>'`` (``nn.Sequential(normaliser,
    model)``), AdvProp checkpoints also hold the auxiliary ``bn_adv`` BatchNorms used only in training.

    Args:
        checkpoint: A loaded checkpoint (dict of tensors, possibly nested) or a source model's state dict.
        entry: The registry entry.

    Example:
        >>> weights = source_state_dict(torch.load('Salman2020Do_R50.pt', weights_only=True), entry)
    """
    state_dict = dict(checkpoint_state_dict(checkpoint))  # 'state_dict' / 'model' nesting, 'module.' prefix
    mean, std = _normaliser(state_dict, _NORMALIZERS[entry.source], entry)
    dropped: List[str] = []
    if entry.source == 'robustbench':
        state_dict = _strip(state_dict, 'model.')
    else:
        if all(k.startswith('1.') for k in state_dict):
            state_dict = _strip(state_dict, '1.')
        if entry.layout == 'easyrobust-advprop':
            dropped = [k for k in state_dict if '.bn_adv.' in k]
            state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    return ImportedWeights(state_dict, mean, std, dropped)


def create_timm_model(entry: ZooEntry, weights: ImportedWeights) -> nn.Module:
    """The plain timm model of ``entry`` holding ``weights``.

    The weights go through timm's pretrained loading: the architecture's own checkpoint filter
    (older timm and original-code layouts) and a strict ``load_state_dict``.

    Raises:
        ExportError: The weights do not fit the architecture.
    """
    # the weights' own origin, not that of timm's default weights of the architecture
    arxiv = entry.paper[1].split('arxiv.org/abs/')[-1] if 'arxiv.org/abs/' in entry.paper[1] else None
    overlay = dict(state_dict=weights.state_dict, source='', hf_hub_id=None, url='', file=None, num_classes=1000,
                   origin_url=entry.paper[1], paper_ids=f'arXiv:{arxiv}' if arxiv else None, paper_name=None,
                   notes=None)
    try:
        model = timm.create_model(entry.architecture, pretrained=True, pretrained_cfg_overlay=overlay,
                                  **dict(entry.model_args))
    except RuntimeError as e:
        raise ExportError(f'{entry.spec}: the weights do not fit timm {entry.architecture}'
                          f'{" " + str(dict(entry.model_args)) if entry.model_args else ""}: '
                          f'{str(e).splitlines()[0][:300]} ... Is it the file the source\'s loader reads for '
                          f'this entry?') from None
    # the overlay's in-memory weights must not travel into the exported config
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != 'state_dict'}
    return model.eval()


def import_robustbench():
    """``import robustbench`` with AutoAttack available under the name it imports (``autoattack``).

    robustbench imports the AutoAttack git package as ``autoattack``; pyautoattack ships the same
    modules as ``pyautoattack``, so the names are aliased here, for this process only.
    """
    try:
        import pyautoattack
        if 'autoattack' not in sys.modules:
            import pkgutil
            sys.modules['autoattack'] = pyautoattack
            for info in pkgutil.iter_modules(pyautoattack.__path__):
                sys.modules.setdefault(f'autoattack.{info.name}', __import__(f'pyautoattack.{info.name}',
                                                                             fromlist=['_']))
    except ImportError:
        pass
    try:
        import robustbench
        import robustbench.data
        import robustbench.utils
    except ImportError as e:
        raise ImportError(f'robustbench is not installed ({e}). Install it without its pins on timm/torch: '
                          f"pip install 'timm-adv[import]' && pip install --no-deps robustbench==1.1.1; "
                          f'or pass --weights FILE.') from None
    return robustbench


def _robustbench_timm_name(entry: ZooEntry) -> str:
    # robustbench's load_model looks up its own timm registrations under this name first
    return f'{entry.name.lower().replace("-", "_")}_imagenet_linf'


def robustbench_model(entry: ZooEntry, weights_file: str) -> nn.Module:
    """The source model, loaded from ``weights_file`` by robustbench's own loader (needs robustbench)."""
    import_robustbench()
    from robustbench.utils import load_model
    name = _robustbench_timm_name(entry)
    if timm.is_model(name):  # its timm path (XCiT): create_model(pretrained=True) reading the file for the URL
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights_file)).eval()
    with tempfile.TemporaryDirectory() as model_dir:
        target = os.path.join(model_dir, 'imagenet', 'Linf')
        os.makedirs(target)
        os.symlink(os.path.abspath(weights_file), os.path.join(target, f'{entry.name}.pt'))
        return load_model(entry.name, model_dir=model_dir, dataset='imagenet', threat_model='Linf').eval()


def robustbench_transform(entry: ZooEntry):
    """robustbench's own eval transform for the entry (needs robustbench)."""
    import_robustbench()
    from robustbench.data import get_preprocessing
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    return get_preprocessing(BenchmarkDataset.imagenet, ThreatModel.Linf, entry.name, None)


def fetch_weights(entry: ZooEntry, cache_dir: Optional[str] = None) -> Any:
    """Downloads the weights through the source's own loader (network needed) and returns its state dict.

    Raises:
        FileNotFoundError: The download failed (offline, say), naming ``--weights`` and where the file comes from.
    """
    try:
        if entry.source == 'robustbench':
            import_robustbench()
            from robustbench.utils import load_model
            model_dir = cache_dir or os.path.join(torch.hub.get_dir(), 'robustbench')
            return load_model(entry.name, model_dir=model_dir, dataset='imagenet', threat_model='Linf').state_dict()
        # EasyRobust's benchmark reads the URL with torch's model_zoo.load_url
        return torch.hub.load_state_dict_from_url(entry.weights, map_location='cpu', model_dir=cache_dir,
                                                  weights_only=True)
    except OSError as e:  # requests' and urllib's connection errors are OSErrors
        reason = ' '.join(str(e).split())[:200]
        raise FileNotFoundError(f'{entry.spec}: the weights could not be downloaded ({type(e).__name__}: {reason}). '
                                f'Offline, download them elsewhere ({entry.weights or "RobustBench"}) and pass '
                                f'--weights FILE.') from None


def sample_images(sizes: Sequence[Tuple[int, int]] = ((57, 43), (38, 50)), seed: int = 0) -> List[Image.Image]:
    """Fixed small RGB images of different aspect ratios (smooth noise) to compare eval pipelines on."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for width, height in sizes:
        coarse = torch.rand((1, 3, max(2, height // 6), max(2, width // 6)), generator=generator)
        fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode='bilinear', align_corners=False)
        fine = fine + 0.15 * torch.rand((1, 3, height, width), generator=generator)
        array = (fine[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        images.append(Image.fromarray(np.ascontiguousarray(array)))
    return images


def entry_data_config(entry: ZooEntry, weights: Optional[ImportedWeights] = None) -> Dict:
    """The timm data config (the exported ``pretrained_cfg``) that reproduces the source's eval transform; mean/std
    are the imported checkpoint's (default: the registry's)."""
    t = entry.transform
    mean, std = (weights.mean, weights.std) if weights is not None else (t.mean, t.std)
    return dict(input_size=t.input_size, crop_pct=t.crop_pct, crop_mode=t.crop_mode, interpolation=t.interpolation,
                mean=mean, std=std)


@torch.no_grad()
def timm_outputs(model: nn.Module, images: Sequence[Image.Image], data_config: Optional[Mapping] = None) -> torch.Tensor:
    """Outputs of a timm model on raw images through timm's eval transform of ``data_config`` (default: the
    model's ``pretrained_cfg``)."""
    transform = create_transform(**(dict(data_config) if data_config else resolve_data_config({}, model=model)))
    return model.eval()(torch.stack([transform(img) for img in images]))


@torch.no_grad()
def compare_with_source(entry: ZooEntry, weights_file: str, folder: str,
                        images: Optional[Sequence[Image.Image]] = None) -> float:
    """Max |output difference| of the source's model + eval transform and the folder's plain timm model + its
    ``pretrained_cfg`` transform, on the same raw images. Needs the source package (robustbench)."""
    if entry.source != 'robustbench':
        raise ImportError(f'{entry.source} cannot be installed beside timm {timm.__version__} (it pins timm 0.5.4); '
                          f'its outputs are compared with pinned references in the test suite.')
    images = list(images or sample_images())
    source = robustbench_model(entry, weights_file)
    transform = robustbench_transform(entry)
    reference = source(torch.stack([transform(img) for img in images]))
    candidate = timm_outputs(timm.create_model(f'local-dir:{folder}', pretrained=True), images)
    return float((reference - candidate).abs().max())


def _metadata(entry: ZooEntry, weights: ImportedWeights, weights_source: str) -> Dict:
    t = entry.transform
    return dict(imported=dict(
        source=entry.source, name=entry.name, spec=entry.spec, weights=weights_source, source_weights=entry.weights,
        paper=dict(title=entry.paper[0], url=entry.paper[1], venue=entry.paper[2]),
        published=dict(entry.published), license_note=entry.license_note,
        layout=f'{entry.layout}: {LAYOUTS[entry.layout]}',
        eval_transform=t.description, normalisation=dict(mean=list(weights.mean), std=list(weights.std)),
        dropped_keys=len(weights.dropped), model_args=dict(entry.model_args)),
        tag=f'{entry.source}_{entry.name.lower().replace("-", "_")}')


def import_zoo_model(spec: str, out_dir: str, weights: Optional[str] = None, repo_id: Optional[str] = None,
                     overwrite: bool = False, cache_dir: Optional[str] = None, check_source: bool = True) -> Dict:
    """``source:name`` -> verified plain-timm Hub folder (config.json, model.safetensors, README.md).

    Args:
        spec: ``robustbench:<name>`` or ``easyrobust:<name>`` (see :data:`timm_adv.hub.zoo.ZOO`).
        out_dir: Folder to write.
        weights: The file the source's loader reads for this entry; None: download through the source.
        repo_id: ``org/name`` for the card (default: ``timm-adv/<entry.hub_name>``).
        overwrite: Replace an existing folder.
        cache_dir: Download folder when fetching.
        check_source: Also compare with the source's own model when its package is installed.

    Returns:
        Dict with the folder, architecture, the reload difference (``max_abs_diff``) and the difference
        to the source model on raw images (``source_max_abs_diff``, None when the source is not installed).

    Raises:
        ValueError: Unknown or refused entry (the reason), weights that do not fit.

    Example:
        >>> import_zoo_model('easyrobust:advtrain_swin_base_patch4_window7_224_ep4', 'hub/swin_b',
        ...                  weights='advtrain_swin_base_patch4_window7_224_ep4.pth')
    """
    from .model_card import write_model_card
    entry = get_zoo_entry(spec)
    if weights is None:
        checkpoint, weights_source = fetch_weights(entry, cache_dir), entry.weights
    else:
        checkpoint, weights_source = read_checkpoint(weights, '--weights'), os.path.basename(weights)
    imported = source_state_dict(checkpoint, entry)
    model = create_timm_model(entry, imported)
    exported = export_from_task(model, out_dir, entry_data_config(entry, imported), architecture=entry.architecture,
                                label_names=label_names_for('imagenet', model.num_classes), license=entry.license,
                                metadata=_metadata(entry, imported, weights_source), overwrite=overwrite,
                                model_args=entry.model_args)
    card = write_model_card(out_dir, repo_id or f'timm-adv/{entry.hub_name}')
    source_diff = None
    if check_source and entry.source == 'robustbench':
        try:
            source_diff = _compare_saved(entry, imported, weights, out_dir)
        except ImportError as e:
            _logger.info(f'Not compared with the source model: {e}')
    return dict(folder=out_dir, spec=entry.spec, architecture=entry.architecture, max_abs_diff=exported.max_abs_diff,
                source_max_abs_diff=source_diff, model_card=card)


def _compare_saved(entry: ZooEntry, imported: ImportedWeights, weights: Optional[str], folder: str) -> float:
    """Compares with the source model; weights fetched in memory are written as the file its loader reads."""
    import_robustbench()
    if weights is not None:
        return compare_with_source(entry, weights, folder)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{entry.name}.pt')
        torch.save(imported.state_dict, path)
        return compare_with_source(entry, path, folder)

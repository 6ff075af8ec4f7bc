"""``create_vqgan``: a frozen VQGAN from a preset, a local file or folder, ``local-dir:`` or ``hf-hub:``.

Folder layouts understood (the first match wins):

- ours, written by ``save_vqgan`` / ``python -m timm_adv.vqgan fit``: ``config.yaml`` + ``model.safetensors``;
- taming-transformers' downloads: ``configs/model.yaml`` + ``checkpoints/last.ckpt``;
- latent-diffusion's: ``config.yaml`` + ``model.ckpt``.

A preset name (``vq-f8``) reads its published weights from one place, the preset's cache folder
``$TIMM_ADV_HOME/vqgan/<preset>/`` (default ``~/.cache/timm_adv/vqgan/<preset>/``): the downloaded
``.ckpt`` copied there, or the folder ``python -m timm_adv.vqgan convert <file> --config <preset>`` writes.
Nothing is downloaded.

Weights are read with safetensors or ``torch.load(weights_only=True)``. Lightning checkpoints (taming,
latent-diffusion, EasyRobust's copy) also pickle training objects beside the weights (e.g. a
``pytorch_lightning`` ``ModelCheckpoint`` callback), which weights-only loading refuses: those classes are
read as inert placeholders, never imported or run, so such a file loads without ``unsafe_pickle`` and
without Lightning installed. The loss / discriminator keys of training checkpoints are dropped, and every
other key must be present with its config's shape: a checkpoint that does not fit its config fails
naming both files.
"""
import logging
import os
import pickle
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import yaml

from timm_adv.utils.checkpoint import state_dict_mismatch
from timm_adv.utils.files import atomic_write, file_sha256

from .config import VQGAN_PRESETS, list_vqgan_presets, load_vqgan_config
from .discretizer import VQGANDiscretizer
from .model import VQModel

__all__ = ['create_vqgan', 'save_vqgan', 'load_vqgan_weights', 'vqgan_home', 'preset_folder', 'CONFIG_FILE',
           'WEIGHTS_FILE']

_logger = logging.getLogger(__name__)

CONFIG_FILE = 'config.yaml'
WEIGHTS_FILE = 'model.safetensors'
_CONFIG_CANDIDATES = (CONFIG_FILE, 'model.yaml', os.path.join('configs', 'model.yaml'))
_WEIGHTS_CANDIDATES = (WEIGHTS_FILE, 'model.ckpt', 'last.ckpt', os.path.join('checkpoints', 'last.ckpt'))
_WEIGHTS_EXTENSIONS = ('.safetensors', '.ckpt', '.pth', '.pt', '.bin')
# training-only parts of taming / LDM checkpoints (LPIPS, discriminator): not part of the VQGAN
_IGNORED_PREFIXES = ('loss.',)


def _first_existing(folder: str, names) -> Optional[str]:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def vqgan_home() -> str:
    """Root of the preset cache: ``$TIMM_ADV_HOME/vqgan``, by default ``~/.cache/timm_adv/vqgan``."""
    home = os.environ.get('TIMM_ADV_HOME') or os.path.join(os.path.expanduser('~'), '.cache', 'timm_adv')
    return os.path.join(home, 'vqgan')


def preset_folder(name: str) -> str:
    """Where the weights of preset ``name`` go (see the module docstring).

    Example:
        >>> preset_folder('vq-f8')
        '/home/me/.cache/timm_adv/vqgan/vq-f8'
    """
    return os.path.join(vqgan_home(), name)


def _preset_weights(name: str) -> str:
    folder = preset_folder(name)
    preset = VQGAN_PRESETS[name]
    found = _first_existing(folder, preset['files'])
    if found is None:
        raise ValueError(
            f'VQGAN preset {name!r} needs its published weights in {folder} ({" or ".join(preset["files"])}); nothing '
            f'is downloaded. Get {preset["weights"]}, then either copy the .ckpt there as '
            f'{os.path.join(folder, preset["files"][1])}, or convert it once to safetensors with `python -m '
            f'timm_adv.vqgan convert <file.ckpt> --config {name}` (writes that folder; no --unsafe-pickle needed). '
            f'TIMM_ADV_HOME moves the cache; a file elsewhere works as --adv-dat-vqgan <file.ckpt> '
            f'--adv-dat-vqgan-config {name}.')
    return found


class _Inert:
    """Stands in for a training object pickled beside the weights; built from nothing, never run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_checkpoint(path: str):
    """``torch.load(weights_only=True)``, with pickled training classes read as :class:`_Inert`.

    The weights-only unpickler still refuses the modules that can run code (``os``, ``subprocess``, ...).
    """
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not foreign:
            raise
    _logger.info(f'VQGAN weights {path}: training objects {", ".join(foreign)} read as inert placeholders.')
    with torch.serialization.safe_globals([(_Inert, name) for name in foreign]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _read_weights(path: str, unsafe_pickle: bool) -> Dict[str, torch.Tensor]:
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:
            raise ValueError(f'VQGAN weights {path!r}: cannot read this safetensors file ({type(e).__name__}: '
                             f'{str(e).splitlines()[0][:200]}).') from None
    if unsafe_pickle:
        _logger.warning(f'VQGAN weights {path!r}: unsafe_pickle loads it with torch.load(weights_only=False), which '
                        f'runs any code the file holds; use it only for a file you trust, then re-save it as '
                        f'safetensors (python -m timm_adv.vqgan convert).')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False) if unsafe_pickle else \
            _load_checkpoint(path)
    except Exception as e:
        hint = '' if unsafe_pickle else (
            ' It pickles objects that weights-only loading refuses: if you trust the file, pass unsafe_pickle=True '
            '(--unsafe-pickle of `python -m timm_adv.vqgan convert`) once and use the safetensors folder it writes.')
        raise ValueError(f'VQGAN weights {path!r}: cannot read this checkpoint ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200]}).{hint}') from None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('state_dict'), Mapping):
        checkpoint = checkpoint['state_dict']
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'VQGAN weights {path!r}: expected a state dict or a checkpoint with "state_dict", got '
                         f'{type(checkpoint).__name__}.')
    return dict(checkpoint)


def load_vqgan_weights(model: VQModel, path: str, unsafe_pickle: bool = False) -> str:
    """Loads ``path`` into ``model`` strictly (loss/discriminator keys aside); returns the file's SHA-256.

    Raises:
        ValueError: Unreadable file, or keys / shapes that do not fit the model's config (both named).
    """
    if not os.path.isfile(path):
        raise ValueError(f'VQGAN weights {path!r}: no such file.')
    state_dict = {k: v for k, v in _read_weights(path, unsafe_pickle).items() if not k.startswith(_IGNORED_PREFIXES)}
    detail = state_dict_mismatch(state_dict, model.state_dict())
    if detail:
        cfg = model.config
        raise ValueError(f'VQGAN weights {path!r} do not fit config {cfg.source or "(given)"!r} (n_embed '
                         f'{cfg.n_embed}, embed_dim {cfg.embed_dim}, ch {cfg.ddconfig["ch"]}, ch_mult '
                         f'{cfg.ddconfig["ch_mult"]}): '
                         f'{detail}. Pass the config the weights were trained with.')
    model.load_state_dict(state_dict)
    return file_sha256(path)


def _resolve_folder(folder: str, config: Optional[str]) -> Tuple[str, Optional[str]]:
    config_path = config or _first_existing(folder, _CONFIG_CANDIDATES)
    weights = _first_existing(folder, _WEIGHTS_CANDIDATES)
    lacking = ([f'a config ({", ".join(_CONFIG_CANDIDATES)})'] if config_path is None else []) + \
        ([f'a weights file ({", ".join(_WEIGHTS_CANDIDATES)})'] if weights is None else [])
    if lacking:
        raise ValueError(f'VQGAN folder {folder!r} lacks {" and ".join(lacking)}.')
    return config_path, weights


def _resolve_file(path: str, config: Optional[str], checkpoint_path: Optional[str]) -> Tuple[str, Optional[str]]:
    """(config, weights) for a yaml or a weights file given by path."""
    folder = os.path.dirname(os.path.abspath(path))
    if path.endswith(('.yaml', '.yml')):
        weights = checkpoint_path or _first_existing(folder, _WEIGHTS_CANDIDATES) or _first_existing(
            os.path.dirname(folder), _WEIGHTS_CANDIDATES)
        if weights is None:
            raise ValueError(f'VQGAN config {path!r}: no weights beside it ({", ".join(_WEIGHTS_CANDIDATES)}); pass '
                             f'checkpoint_path=.')
        return path, weights
    if not path.endswith(_WEIGHTS_EXTENSIONS):
        raise ValueError(f'VQGAN {path!r}: expected a yaml config or weights ({", ".join(_WEIGHTS_EXTENSIONS)}).')
    stem_yaml = os.path.splitext(path)[0] + '.yaml'
    config_path = config or (stem_yaml if os.path.isfile(stem_yaml) else None) or _first_existing(
        folder, _CONFIG_CANDIDATES) or _first_existing(os.path.dirname(folder), _CONFIG_CANDIDATES)
    if config_path is None:
        raise ValueError(f'VQGAN weights {path!r}: no config found beside it ({os.path.basename(stem_yaml)}, '
                         f'{", ".join(_CONFIG_CANDIDATES)}); pass config= (train.py: --adv-dat-vqgan-config) a yaml path or a preset '
                         f'({", ".join(list_vqgan_presets())}).')
    return config_path, path


def _hub_folder(repo: str) -> str:
    from huggingface_hub import snapshot_download
    repo_id, _, revision = repo.partition('@')
    try:
        return snapshot_download(repo_id, revision=revision or None,
                                 allow_patterns=['*.yaml', '*.yml', '*.safetensors', '*.ckpt'])
    except Exception as e:
        raise ValueError(f'VQGAN hf-hub:{repo}: cannot get it from the Hub or the local cache ({type(e).__name__}: '
                         f'{str(e).splitlines()[0][:200]}).') from None


def create_vqgan(name_or_path: str, device: Optional[Union[str, torch.device]] = None, *,
                 config: Optional[str] = None, checkpoint_path: Optional[str] = None, pretrained: bool = True,
                 bf16: bool = False, channels_last: bool = False, unsafe_pickle: bool = False,
                 chunk_size: Optional[int] = None) -> VQGANDiscretizer:
    """Creates a frozen ``VQGANDiscretizer``.

    Args:
        name_or_path: A preset (``vq-f8``, ``vqgan_imagenet_f16_1024``, ``vqgan_imagenet_f16_16384``), a folder,
            a config yaml, a weights file (``.ckpt``/``.safetensors``, config found beside it or given by
            ``config``), ``local-dir:/folder`` or ``hf-hub:org/name[@revision]``.
        device: Where to put it (default CPU).
        config: Config yaml or preset name overriding the one found next to the weights.
        checkpoint_path: Weights for a preset or a yaml.
        pretrained: With a preset and no ``checkpoint_path``: True reads the weights from the preset's cache
            folder (:func:`preset_folder`; missing weights raise, saying which file goes where); False builds
            random weights (benchmarks).
        bf16: Encoder/decoder under bf16 autocast (quantiser stays fp32).
        channels_last: Encoder/decoder in channels_last memory format.
        unsafe_pickle: Allow ``torch.load(weights_only=False)`` for trusted checkpoints whose pickled
            objects weights-only loading refuses even as placeholders.
        chunk_size: Images per encoder / decoder pass (None: the whole batch).

    Raises:
        ValueError: Unknown name, missing files, unreadable weights, weights that do not fit the config.

    Example:
        >>> vq = create_vqgan('vqgan_mnist')
        >>> vq = create_vqgan('vq-f8', 'cuda', checkpoint_path='vq-f8/model.ckpt', bf16=True)
        >>> vq = create_vqgan('hf-hub:me/vqgan_mnist')
    """
    source = name_or_path
    if name_or_path.startswith('hf-hub:'):
        config_path, weights = _resolve_folder(_hub_folder(name_or_path[len('hf-hub:'):]), config)
    elif name_or_path.startswith('local-dir:'):
        folder = name_or_path[len('local-dir:'):]
        if not os.path.isdir(folder):
            raise ValueError(f'VQGAN {name_or_path!r}: {folder!r} is not a folder.')
        config_path, weights = _resolve_folder(folder, config)
    elif name_or_path in VQGAN_PRESETS:
        config_path, weights = config or name_or_path, checkpoint_path
        if weights is None and pretrained:
            weights = _preset_weights(name_or_path)
    elif os.path.isdir(name_or_path):
        config_path, weights = _resolve_folder(name_or_path, config)
    elif os.path.isfile(name_or_path):
        config_path, weights = _resolve_file(name_or_path, config, checkpoint_path)
    else:
        raise ValueError(f'Unknown VQGAN {name_or_path!r}: not a preset ({", ".join(list_vqgan_presets())}), an '
                         f'existing file or folder, local-dir:<folder> or hf-hub:<org>/<name>.')
    model = VQModel(load_vqgan_config(config_path))
    sha = load_vqgan_weights(model, weights, unsafe_pickle) if weights else None
    vq = VQGANDiscretizer(model, source=source, weights=os.path.abspath(weights) if weights else None,
                          weights_sha256=sha, bf16=bf16, channels_last=channels_last, chunk_size=chunk_size)
    return vq.to(device) if device is not None else vq


def save_vqgan(model: Union[VQModel, VQGANDiscretizer], folder: str, metadata: Optional[Mapping] = None) -> str:
    """Writes ``config.yaml`` (taming layout) and ``model.safetensors`` to ``folder``, each atomically.

    ``create_vqgan(folder)`` (or ``local-dir:folder``, or the folder uploaded to the Hub) loads it back.

    Args:
        model: The network, or a discretizer wrapping it.
        folder: Created if needed; existing files of the same names are replaced.
        metadata: Plain-typed extra information stored under ``timm_adv:`` in the yaml (fit results).

    Returns:
        The folder.

    Example:
        >>> save_vqgan(VQModel(cfg), '/tmp/tiny_vqgan')
        >>> vq = create_vqgan('/tmp/tiny_vqgan')
    """
    from safetensors.torch import save_file
    net = model.model if isinstance(model, VQGANDiscretizer) else model
    os.makedirs(folder, exist_ok=True)
    content = net.config.to_yaml_dict()
    if metadata:
        content['timm_adv'] = dict(metadata)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(os.path.join(folder, WEIGHTS_FILE), lambda p: save_file(state_dict, p))

    def write_yaml(p):
        with open(p, 'w') as f:
            yaml.safe_dump(content, f, sort_keys=False)
    atomic_write(os.path.join(folder, CONFIG_FILE), write_yaml)
    return folder

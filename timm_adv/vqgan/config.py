"""VQGAN architecture configs: taming / latent-diffusion yaml files and named presets.

A config is what taming's ``VQModel(**config.model.params)`` receives: ``embed_dim`` (codebook vector
size), ``n_embed`` (codebook entries) and ``ddconfig`` (the Encoder/Decoder arguments). The yaml files
that ship with taming-transformers and latent-diffusion checkpoints are read as they are; the
``lossconfig`` and training keys in them are ignored.
"""
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

import yaml

__all__ = ['VQGANConfig', 'VQGAN_PRESETS', 'list_vqgan_presets', 'load_vqgan_config']

_DDCONFIG_KEYS = ('ch', 'out_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'in_channels', 'resolution',
                  'z_channels')


@dataclass
class VQGANConfig:
    """Architecture of a taming-style VQGAN (``VQModel``).

    Args:
        embed_dim: Size of a codebook vector (``quant_conv`` output channels).
        n_embed: Number of codebook entries.
        ddconfig: Encoder/Decoder arguments of ``taming.modules.diffusionmodules.model``.
        source: Where the config came from (preset name or yaml path), for error messages.

    Example:
        >>> cfg = VQGANConfig(embed_dim=4, n_embed=256, ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 2, 2],
        ...     num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=32, z_channels=4))
        >>> cfg.downsample_factor
        4
    """
    embed_dim: int
    n_embed: int
    ddconfig: Dict[str, Any]
    source: str = field(default='', compare=False)

    def __post_init__(self):
        where = f'VQGAN config {self.source!r}' if self.source else 'VQGAN config'
        missing = [k for k in _DDCONFIG_KEYS if k not in self.ddconfig]
        if missing:
            raise ValueError(f'{where}: ddconfig lacks {", ".join(missing)}.')
        if self.ddconfig.get('double_z', False):
            raise ValueError(f'{where}: ddconfig.double_z is true (a KL autoencoder); a VQGAN needs double_z: false.')
        # taming's Encoder defaults to double_z=True: an omitted key must reach it as false
        self.ddconfig = {**self.ddconfig, 'double_z': False}
        if int(self.n_embed) < 2 or int(self.embed_dim) < 1:
            raise ValueError(f'{where}: n_embed must be >= 2 and embed_dim >= 1, got {self.n_embed}, {self.embed_dim}.')
        # taming's Normalize is GroupNorm(32): every width must split into 32 groups
        widths = [int(self.ddconfig['ch']) * int(m) for m in self.ddconfig['ch_mult']]
        if any(w % 32 for w in widths):
            raise ValueError(f'{where}: ch x ch_mult gives widths {widths}; taming normalises with GroupNorm(32), '
                             f'so every width must be a multiple of 32.')
        self.embed_dim = int(self.embed_dim)
        self.n_embed = int(self.n_embed)
        self.ddconfig = dict(self.ddconfig, ch_mult=list(self.ddconfig['ch_mult']),
                             attn_resolutions=list(self.ddconfig['attn_resolutions']))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig['ch_mult']) - 1)

    def params(self) -> Dict[str, Any]:
        """``model.params`` of a taming yaml (plain types, yaml/JSON-safe)."""
        return dict(embed_dim=self.embed_dim, n_embed=self.n_embed, ddconfig=copy.deepcopy(self.ddconfig))

    def to_yaml_dict(self) -> Dict[str, Any]:
        """The taming layout ``{model: {target, params}}`` that ``load_vqgan_config`` reads back.

        ``lossconfig: torch.nn.Identity`` (no training loss) makes the file usable by taming's own
        ``VQModel(**config.model.params)`` too.
        """
        params = dict(self.params(), lossconfig=dict(target='torch.nn.Identity'))
        return dict(model=dict(target='taming.models.vqgan.VQModel', params=params))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = '') -> 'VQGANConfig':
        """Reads a taming/LDM yaml dict (``model.params``), a ``params`` dict, or ``describe()['config']``."""
        params = config
        if isinstance(params.get('model'), Mapping):
            params = params['model']
        if isinstance(params.get('params'), Mapping):
            params = params['params']
        missing = [k for k in ('embed_dim', 'n_embed', 'ddconfig') if k not in params]
        if missing:
            raise ValueError(f'VQGAN config {source!r} lacks {", ".join(missing)} (expected taming layout '
                             f'model.params.{{embed_dim, n_embed, ddconfig}}).')
        return cls(embed_dim=params['embed_dim'], n_embed=params['n_embed'], ddconfig=dict(params['ddconfig']),
                   source=source)


def _ddconfig(ch_mult, attn_resolutions, z_channels, resolution=256):
    return dict(double_z=False, z_channels=z_channels, resolution=resolution, in_channels=3, out_ch=3, ch=128,
                ch_mult=list(ch_mult), num_res_blocks=2, attn_resolutions=list(attn_resolutions), dropout=0.0)


#: Published VQGANs, their architecture, where the weights are published and the file names accepted in the
#: preset's cache folder (``timm_adv.vqgan.preset_folder``). Weights are never downloaded here.
VQGAN_PRESETS: Dict[str, Dict[str, Any]] = {
    'vq-f8': dict(
        params=dict(embed_dim=4, n_embed=16384, ddconfig=_ddconfig([1, 2, 2, 4], [32], z_channels=4)),
        description='latent-diffusion first-stage VQ model, OpenImages, f=8, 16384 codes; the model DAT uses',
        files=('model.safetensors', 'model.ckpt', 'vqgan_openimages_f8_16384.ckpt'),
        weights='https://ommer-lab.com/files/latent-diffusion/vq-f8.zip (model.ckpt; config: latent-diffusion '
                'models/first_stage_models/vq-f8/config.yaml). EasyRobust mirrors the same weights as '
                'http://alisec-competition.oss-cn-shanghai.aliyuncs.com/xiaofeng/easy_robust/pretrained_models/'
                'vqgan_openimages_f8_16384.ckpt'),
    'vqgan_imagenet_f16_1024': dict(
        params=dict(embed_dim=256, n_embed=1024, ddconfig=_ddconfig([1, 1, 2, 2, 4], [16], z_channels=256)),
        description='taming-transformers VQGAN, ImageNet, f=16, 1024 codes',
        files=('model.safetensors', 'last.ckpt'),
        weights='https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/ (ckpts/last.ckpt, configs/model.yaml), '
                'linked from the taming-transformers README'),
    'vqgan_imagenet_f16_16384': dict(
        params=dict(embed_dim=256, n_embed=16384, ddconfig=_ddconfig([1, 1, 2, 2, 4], [16], z_channels=256)),
        description='taming-transformers VQGAN, ImageNet, f=16, 16384 codes',
        files=('model.safetensors', 'last.ckpt'),
        weights='https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/ (ckpts/last.ckpt, configs/model.yaml), '
                'linked from the taming-transformers README'),
}


def list_vqgan_presets():
    return sorted(VQGAN_PRESETS)


def load_vqgan_config(name_or_path: str) -> VQGANConfig:
    """A config from a preset name or a taming/LDM yaml file.

    Raises:
        ValueError: Unknown preset, missing file, or a yaml without the VQModel parameters.

    Example:
        >>> load_vqgan_config('vq-f8').downsample_factor
        8
    """
    if name_or_path in VQGAN_PRESETS:
        return VQGANConfig.from_dict(VQGAN_PRESETS[name_or_path]['params'], source=name_or_path)
    if not os.path.isfile(name_or_path):
        raise ValueError(f'VQGAN config {name_or_path!r} is neither a preset ({", ".join(list_vqgan_presets())}) '
                         f'nor an existing yaml file.')
    with open(name_or_path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f'VQGAN config {name_or_path!r} is not a yaml mapping.')
    return VQGANConfig.from_dict(config, source=name_or_path)

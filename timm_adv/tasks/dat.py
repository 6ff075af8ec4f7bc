"""DAT: Discrete Adversarial Training (Mao et al., NeurIPS 2022).

Each step trains on the clean batch and on its discrete adversarial version (see
:class:`~timm_adv.augment.DiscreteAdversarialAugment`): ``loss = w_clean * CE(f(x)) + w_dat *
CE(f(x_dat))``, one backward. The official code (EasyRobust ``examples/imageclassification/imagenet/
dat``) runs the two forwards separately, so each batch normalises with its own BN statistics; so
does this task. Defaults follow the official code:

* attack: one L2 step of 0.1 within eps 0.1 at the reconstruction, random start on the eps sphere
  with probability 0.8 per batch, the model in train mode, in fp32 inside the training autocast
  (batch statistics; running statistics are left alone: ``--adv-bn-mode train``; the official step
  updates them four times per step, reproduced by ``--adv-dat-official-bn``);
* ``w_clean = w_dat = 1``; soft targets from mixup / cutmix go to the attack and both losses.

The VQGAN (``--adv-dat-vqgan``: a preset, a folder or file, ``hf-hub:`` or ``local-dir:``) is built
once, frozen, and is never part of the model: not in checkpoints (its identity is, in the task
state), not exported. ``--adv-dat-aux-bn`` sends the DAT examples (attack and loss) through
AdvProp's auxiliary BatchNorms, dropped at export.
"""
import argparse
import contextlib
import copy
import functools
import logging
import os
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.data import resolve_data_config

from timm_adv.augment import (PREVIEW_ROWS, DiscreteAdversarialAugment, check_vqgan_input_size, compile_vqgan,
                              save_dat_preview)
from timm_adv.layers import convert_dual_bn, dual_bn_layers, dual_bn_route, strip_aux_bn
from timm_adv.utils import scrub
from .arg_types import bounded_type
from .aux_bn_state import AuxBNStateMixin
from .base import AdversarialTask, top1
from .registry import register_method

__all__ = ['DATTask', 'DAT_FLAG_DEFAULTS', 'DAT_PREVIEW_FILE']

#: The model card's picture of the clean, reconstructed and DAT images (:meth:`DATTask.card_images`).
DAT_PREVIEW_FILE = 'dat_preview.png'

_logger = logging.getLogger(__name__)

#: ``--adv-dat-*`` flags and their defaults, the official behaviour (channels_last only changes speed, and the
#: result up to float rounding): ``add_args``, ``__init__`` and the checks read them, and
#: :meth:`DATTask.setting` fills them into namespaces built without the DAT flags.
DAT_FLAG_DEFAULTS: Dict[str, Any] = dict(
    adv_dat_vqgan=None, adv_dat_vqgan_config=None, adv_dat_start_prob=0.8, adv_dat_start_on_sphere=True,
    adv_dat_clean_weight=1.0, adv_dat_weight=1.0, adv_dat_aux_bn=False, adv_dat_vqgan_bf16=False,
    adv_dat_vqgan_channels_last=None, adv_dat_vqgan_compile=False, adv_dat_vqgan_chunk=0,
    adv_dat_vqgan_memory_gb=None, adv_dat_official_bn=False,
)
_VQGAN_HELP = '<preset | folder | file | hf-hub:org/name | local-dir:folder>'


def _check_loss_weights(clean_weight: float, dat_weight: float) -> None:
    if clean_weight < 0 or not dat_weight > 0:
        raise ValueError(f'--adv-dat-clean-weight must be >= 0 and --adv-dat-weight > 0, got {clean_weight} and '
                         f'{dat_weight} (--adv-method none trains without DAT examples).')


@functools.lru_cache(maxsize=1)
def _load_vqgan(spec: str, config: Optional[str], bf16: bool, compile: bool) -> nn.Module:
    # prepare_model checks it before any data is read and from_args uses it: load the weights once;
    # imported here so that other methods never import taming
    from timm_adv.vqgan import create_vqgan
    try:
        vqgan = create_vqgan(spec, config=config, bf16=bf16)
    except (ValueError, FileNotFoundError) as e:
        flags = f'--adv-dat-vqgan {spec!r}' + (f' --adv-dat-vqgan-config {config!r}' if config else '')
        raise ValueError(f'{flags}: {e}') from None
    return compile_vqgan(vqgan) if compile else vqgan


def _vqgan_chunk(args: argparse.Namespace, vqgan: nn.Module, input_size, device: torch.device) -> Optional[int]:
    """``--adv-dat-vqgan-chunk``, or (0) the chunk whose estimated activations fit the memory budget."""
    from timm_adv.vqgan.memory import chunk_for_budget, default_memory_budget, vqgan_activation_bytes
    chunk = DATTask.setting(args, 'adv_dat_vqgan_chunk')
    if chunk:
        return int(chunk)
    gb = DATTask.setting(args, 'adv_dat_vqgan_memory_gb')
    budget = gb * 2 ** 30 if gb else default_memory_budget(device)
    if budget is None:
        return None
    # sized as fp32 under bf16 too: autocast keeps GroupNorm and its SiLU in fp32
    per_image = vqgan_activation_bytes(vqgan.config, input_size[-2], input_size[-1])
    return chunk_for_budget(per_image, budget)


def _vqgan_identity(vqgan: nn.Module) -> Dict[str, Any]:
    describe = getattr(vqgan, 'describe', None)
    return dict(describe()) if callable(describe) else {'type': type(vqgan).__name__}


def _same_vqgan(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    # precision / layout settings may change between runs; weights and architecture may not
    keys = ('weights_sha256', 'config', 'n_embed', 'downsample_factor')
    return all(a.get(k) == b.get(k) for k in keys)


@register_method('dat')
class DATTask(AuxBNStateMixin, AdversarialTask):
    """Discrete adversarial training of any timm model (see the module docstring).

    Args:
        model: Model to train (converted by :meth:`prepare_model` when ``aux_bn``).
        criterion: Training loss for both batches (soft targets from mixup / cutmix work).
        augment: The discrete adversarial augmentation (VQGAN + attack).
        clean_weight: Weight of the clean loss (0 trains on the DAT batch only).
        dat_weight: Weight of the DAT loss.
        aux_bn: Route the DAT examples (attack and loss) through the auxiliary BNs.
        official_bn: Update BN running statistics as the official code does (see :meth:`forward`); the attack
            must then run in ``train_update`` BN mode.

    Example:
        >>> attack = create_attack(0.1, steps=1, step_size=0.1, norm='l2', bn_mode='train', start_prob=0.8,
        ...                        start_on_sphere=True, mean=mean, std=std)
        >>> task = DATTask(model, nn.CrossEntropyLoss(), DiscreteAdversarialAugment(vqgan, attack))
        >>> task(x, y)['loss'].backward()
    """

    paper = 'Enhance the Visual Representation via Discrete Adversarial Training (Mao et al., NeurIPS 2022)'
    url = 'https://arxiv.org/abs/2209.07735'
    citation = ('@inproceedings{mao2022enhance,\n  title = {Enhance the Visual Representation via Discrete '
                'Adversarial Training},\n  author = {Mao, Xiaofeng and Chen, Yuefeng and Duan, Ranjie and Zhu, Yao '
                'and Qi, Gege and Ye, Shaokai and Li, Xiaodan and Zhang, Rong and Xue, Hui},\n  booktitle = '
                '{NeurIPS},\n  year = {2022}\n}')

    default_bn_mode = 'train'
    attack_defaults: Dict[str, Any] = dict(eps=0.1, steps=1, step_size=0.1, norm='l2', random_start=True)
    flag_defaults = DAT_FLAG_DEFAULTS
    param_flags = {**AdversarialTask.param_flags, 'start_prob': '--adv-dat-start-prob'}

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            augment: DiscreteAdversarialAugment,
            clean_weight: float = DAT_FLAG_DEFAULTS['adv_dat_clean_weight'],
            dat_weight: float = DAT_FLAG_DEFAULTS['adv_dat_weight'],
            aux_bn: bool = DAT_FLAG_DEFAULTS['adv_dat_aux_bn'],
            official_bn: bool = DAT_FLAG_DEFAULTS['adv_dat_official_bn'],
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, attack=augment.attack, device=device, dtype=dtype, verbose=verbose)
        _check_loss_weights(clean_weight, dat_weight)
        if aux_bn and not dual_bn_layers(self.unwrapped_model):
            raise ValueError('DATTask(aux_bn=True) needs a model with auxiliary BNs; convert it with '
                             'DATTask.prepare_model (or timm_adv.layers.convert_dual_bn) first.')
        if official_bn and (aux_bn or augment.attack.bn_mode != 'train_update' or not clean_weight > 0):
            raise ValueError('--adv-dat-official-bn reproduces the official BN updates: it needs the attack in '
                             '--adv-bn-mode train_update, a clean loss (--adv-dat-clean-weight > 0) and no '
                             '--adv-dat-aux-bn.')
        self.augment = augment
        self.official_bn = official_bn
        self.clean_weight = float(clean_weight)
        self.dat_weight = float(dat_weight)
        self.aux_bn = aux_bn
        self.vqgan_identity = _vqgan_identity(augment.vqgan)
        if verbose:
            _logger.info(f'DAT: VQGAN {self.vqgan_identity.get("source", "?")} (f={self.vqgan_identity.get("downsample_factor")}, '
                         f'{self.vqgan_identity.get("n_embed")} codes, channels_last {self.vqgan_identity.get("channels_last")}, '
                         f'chunk {self.vqgan_identity.get("chunk_size") or "whole batch"}), attack {augment.attack!r}, loss '
                         f'{clean_weight:g} * CE(clean) + {dat_weight:g} * CE(DAT){", DAT through auxiliary BNs" if aux_bn else ""}.')

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.flag_defaults
        group.add_argument('--adv-dat-vqgan', default=d['adv_dat_vqgan'], metavar='VQGAN',
                           help=f'dat: the VQGAN discretiser, {_VQGAN_HELP} (required by --adv-method dat); a preset '
                                f'(vq-f8) reads its weights from $TIMM_ADV_HOME/vqgan/<preset>/ (default '
                                f'~/.cache/timm_adv/vqgan/<preset>/)')
        group.add_argument('--adv-dat-vqgan-config', default=d['adv_dat_vqgan_config'], metavar='CONFIG',
                           help='dat: architecture of a bare weights file given to --adv-dat-vqgan (a .ckpt without a '
                                'config beside it): a preset (vq-f8) or a taming / latent-diffusion yaml')
        group.add_argument('--adv-dat-start-prob', type=float, default=d['adv_dat_start_prob'], metavar='P',
                           help='dat: probability (one draw per batch) of the random start (default: %(default)s)')
        group.add_argument('--adv-dat-start-on-sphere', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_start_on_sphere'],
                           help='dat: random start on the eps sphere, as the official code; --no-... draws it inside '
                                'the ball (default: sphere)')
        group.add_argument('--adv-dat-clean-weight', type=bounded_type('--adv-dat-clean-weight', float, 0),
                           default=d['adv_dat_clean_weight'], metavar='W',
                           help='dat: weight of CE(clean) (default: %(default)s)')
        group.add_argument('--adv-dat-weight', type=bounded_type('--adv-dat-weight', float, 0),
                           default=d['adv_dat_weight'], metavar='W',
                           help='dat: weight of CE(DAT examples) (default: %(default)s)')
        group.add_argument('--adv-dat-aux-bn', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_aux_bn'],
                           help='dat: route the DAT examples through auxiliary BatchNorms (AdvProp-style), dropped '
                                'at export (default: off)')
        group.add_argument('--adv-dat-official-bn', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_official_bn'],
                           help='dat: update BatchNorm running statistics as the official code: clean forward, attack '
                                'forward, the attack\'s final forward, DAT forward (4 updates, the DAT batch last; one '
                                'more forward, and the clean graph is held while the VQGAN runs); default: DAT then '
                                'clean, 2 updates, running statistics untouched by the attack')
        group.add_argument('--adv-dat-vqgan-bf16', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_vqgan_bf16'],
                           help='dat: run the VQGAN encoder/decoder under bf16 autocast; fast on GPUs and CPUs with '
                                'bf16 units, slow elsewhere (default: fp32, as the official code)')
        group.add_argument('--adv-dat-vqgan-channels-last', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_vqgan_channels_last'],
                           help='dat: run the VQGAN in channels_last memory format; on CPU 1.8x faster for a tiny VQGAN '
                                '(benchmarks/dat_cost.py); on CUDA its GroupNorms may convert formats and no GPU '
                                'measurement says it helps (default: on for CPU, off for CUDA)')
        group.add_argument('--adv-dat-vqgan-compile', action=argparse.BooleanOptionalAction,
                           default=d['adv_dat_vqgan_compile'],
                           help='dat: torch.compile the VQGAN encoder and decoder once (every pass padded to the chunk '
                                'size, so the varying count of re-decoded samples does not recompile): faster passes '
                                'after minutes of compilation, worth it for long runs (default: off)')
        group.add_argument('--adv-dat-vqgan-chunk', type=bounded_type('--adv-dat-vqgan-chunk', int, 0),
                           default=d['adv_dat_vqgan_chunk'], metavar='N',
                           help='dat: images per VQGAN encoder / decoder pass (its activations take about 0.2 GB per '
                                '224 px image in fp32); 0 picks the largest chunk within --adv-dat-vqgan-memory-gb '
                                '(default: 0)')
        group.add_argument('--adv-dat-vqgan-memory-gb', type=bounded_type('--adv-dat-vqgan-memory-gb', float, 0),
                           default=d['adv_dat_vqgan_memory_gb'], metavar='GB',
                           help='dat: memory budget of the VQGAN passes for the automatic chunk (default: a quarter '
                                'of the GPU; on CPU the whole batch at once)')

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if not getattr(args, 'adv_dat_vqgan', None):
            raise ValueError(f'--adv-method dat needs a VQGAN: pass --adv-dat-vqgan {_VQGAN_HELP}; on small images '
                             f'fit one first (python -m timm_adv.vqgan fit).')
        prob = cls.setting(args, 'adv_dat_start_prob')
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'--adv-dat-start-prob must be in [0, 1], got {prob}.')
        _check_loss_weights(cls.setting(args, 'adv_dat_clean_weight'), cls.setting(args, 'adv_dat_weight'))
        if cls.setting(args, 'adv_dat_vqgan_chunk') and cls.setting(args, 'adv_dat_vqgan_memory_gb'):
            raise ValueError('--adv-dat-vqgan-memory-gb sets the automatic chunk, which --adv-dat-vqgan-chunk N '
                             'replaces: drop one of them.')
        bn_mode = getattr(args, 'adv_bn_mode', None)
        if cls.setting(args, 'adv_dat_official_bn') and bn_mode not in (None, 'train_update'):
            raise ValueError(f'--adv-dat-official-bn runs the attack in --adv-bn-mode train_update (as the official '
                             f'code), not {bn_mode}: drop one of them.')

    @classmethod
    def prepare_model(cls, model: nn.Module, args: Optional[argparse.Namespace] = None) -> nn.Module:
        """Checks the VQGAN against the input size and, with ``--adv-dat-aux-bn``, gives every BatchNorm an
        auxiliary copy; called before any data is read, so a bad VQGAN fails first."""
        if args is None:
            return model
        check_vqgan_input_size(cls.create_vqgan(args), resolve_data_config(vars(args), model=model)['input_size'])
        if not cls.setting(args, 'adv_dat_aux_bn'):
            return model
        model = convert_dual_bn(model)
        if not dual_bn_layers(model):
            name = getattr(args, 'model', None) or type(model).__name__
            raise ValueError(f'--adv-dat-aux-bn needs BatchNorm layers, but {name!r} has none (LayerNorm / GroupNorm '
                             f'models such as ViT or ConvNeXt): drop --adv-dat-aux-bn.')
        return model

    @classmethod
    def create_vqgan(cls, args: argparse.Namespace, device: Optional[torch.device] = None,
                     input_size=None) -> nn.Module:
        """The frozen VQGAN named by ``--adv-dat-vqgan`` (loaded once per process), errors naming the flag.

        With ``device`` it is moved there in the memory format measured faster on that device (unless
        ``--adv-dat-vqgan-channels-last`` says otherwise); with ``input_size`` its chunk is set too.
        """
        cls.check_args(args)
        vqgan = _load_vqgan(args.adv_dat_vqgan, cls.setting(args, 'adv_dat_vqgan_config'),
                            cls.setting(args, 'adv_dat_vqgan_bf16'), cls.setting(args, 'adv_dat_vqgan_compile'))
        if device is None:
            return vqgan
        device = torch.device(device)
        channels_last = cls.setting(args, 'adv_dat_vqgan_channels_last')
        vqgan.set_channels_last(device.type == 'cpu' if channels_last is None else channels_last)
        if input_size is not None:
            vqgan.chunk_size = _vqgan_chunk(args, vqgan, input_size, device)
        return vqgan.to(device)

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'DATTask':
        input_size = resolve_data_config(vars(args), model=model)['input_size']
        vqgan = cls.create_vqgan(args, device or torch.device('cpu'), input_size)
        check_vqgan_input_size(vqgan, input_size)
        official_bn = cls.setting(args, 'adv_dat_official_bn')
        attack = cls.attack_from_args(
            args, mean, std, bn_mode='train_update' if official_bn else None,
            start_prob=cls.setting(args, 'adv_dat_start_prob'),
            start_on_sphere=cls.setting(args, 'adv_dat_start_on_sphere'))
        return cls(model, criterion, DiscreteAdversarialAugment(vqgan, attack),
                   clean_weight=cls.setting(args, 'adv_dat_clean_weight'),
                   dat_weight=cls.setting(args, 'adv_dat_weight'),
                   aux_bn=cls.setting(args, 'adv_dat_aux_bn'), official_bn=official_bn, device=device)

    def ideal_cost(self) -> Dict[str, float]:
        cost = super().ideal_cost()
        cost['train_steps'] = 2.0 if self.clean_weight > 0 else 1.0
        cost['vqgan_passes'] = 2.0  # reconstruct(x) and reconstruct(x_adv)
        return cost

    def _dat_route(self):
        return dual_bn_route(self.unwrapped_model, 'aux') if self.aux_bn else contextlib.nullcontext()

    def _clean(self, input: torch.Tensor, target: torch.Tensor, result: Dict[str, torch.Tensor]):
        output = self.trainable_module(input)
        loss_clean = self.criterion(output, target)
        result.update(top1_clean=top1(output, target), loss_clean=loss_clean.detach())
        return output, self.clean_weight * loss_clean

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One DAT step. By default the DAT batch goes first, so no training graph is held while the VQGAN
        runs, and BN running statistics are updated by the DAT then the clean forward. With ``official_bn``
        the official order: clean forward, the attack (``train_update``), the official attack's final
        forward at ``x_rec + delta`` (no gradient; it only updates BN statistics), DAT forward."""
        result: Dict[str, torch.Tensor] = {}
        if self.official_bn:
            output, loss = self._clean(input, target, result)
        with self._dat_route():
            dat = self.augment.generate(self.trainable_module, input, target)
            if self.official_bn:
                with torch.no_grad():
                    self.trainable_module(self.augment.normalizer.from_pixel(dat.attacked).to(input.dtype))
            output_dat = self.trainable_module(dat.images)
        loss_dat = self.criterion(output_dat, target)
        result.update({'top1_dat': top1(output_dat, target), 'loss_dat': loss_dat.detach(),
                       'dat_code_change': dat.code_change, 'dat_samples_changed': dat.samples_changed})
        if self.official_bn:
            loss = loss + self.dat_weight * loss_dat
        elif self.clean_weight > 0:
            output, loss_clean = self._clean(input, target, result)
            loss = self.dat_weight * loss_dat + loss_clean
        else:
            output, loss = output_dat, self.dat_weight * loss_dat
        result.update(loss=loss, output=output)
        return result

    def card_details(self) -> Dict[str, str]:
        v = self.vqgan_identity
        sha = v.get('weights_sha256')
        return {'VQGAN (training only, not in the model)': (
            f'`{v.get("source")}`' + (f', sha256 {sha[:16]}' if sha else ', random weights') +
            f', f={v.get("downsample_factor")}, {v.get("n_embed")} codes')}

    def card_images(self, x: torch.Tensor, target: torch.Tensor, folder: str) -> Dict[str, str]:
        """``dat_preview.png``: the images, their VQGAN reconstructions and the DAT examples of the trained model."""
        model = copy.deepcopy(self.unwrapped_model)  # the attack's BN mode may update statistics: not the trained ones
        device = next(model.parameters()).device
        save_dat_preview(self.augment, model, x.to(device), target.to(device), os.path.join(folder, DAT_PREVIEW_FILE))
        return {f'Rows, top to bottom: {", ".join(PREVIEW_ROWS)} (the trained model attacked)': DAT_PREVIEW_FILE}

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The auxiliary BNs (if any) and the VQGAN's identity; never its weights."""
        # checkpoints travel (export, sharing): the VQGAN's paths lose home folders and host names
        return {**super().get_task_state(module, ema=ema), 'vqgan': scrub(dict(self.vqgan_identity))}

    def load_checkpoint_state(self, state_dict: Dict[str, Any], task_state: Optional[Dict[str, Any]] = None,
                              ema: bool = False, strict: bool = True) -> None:
        """The model (and auxiliary BNs, if any), then the VQGAN check of :meth:`load_task_state`."""
        super().load_checkpoint_state(state_dict, task_state, ema=ema, strict=strict)
        self.load_task_state(task_state, strict=strict, ema=ema)

    def export_model(self) -> nn.Module:
        """The trained model without the auxiliary BNs (a copy if it has them): the original timm architecture."""
        model = self.unwrapped_model
        return strip_aux_bn(copy.deepcopy(model)) if self.aux_bn else model

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        saved = (state or {}).get('vqgan')
        if saved is not None and not _same_vqgan(saved, self.vqgan_identity):
            _logger.warning(f'DAT: the checkpoint was trained with VQGAN {saved.get("source")!r} '
                            f'(sha256 {saved.get("weights_sha256")}), this run uses '
                            f'{self.vqgan_identity.get("source")!r} (sha256 {self.vqgan_identity.get("weights_sha256")}); '
                            f'check --adv-dat-vqgan.')

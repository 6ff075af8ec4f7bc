"""Dual (main + auxiliary) BatchNorm for AdvProp, and the converters in and out of it.

AdvProp (Xie et al., CVPR 2020) normalises clean examples with the model's own ("main") BatchNorms
and adversarial examples with auxiliary copies, then drops the copies at test time.
:class:`DualBatchNorm2d` wraps one existing norm layer (``BatchNorm2d``, timm ``BatchNormAct2d``,
``SyncBatchNorm``, timm ``SyncBatchNormAct``) together with an auxiliary copy of it, and sends each
sample of a batch through one of the two according to a route set for the whole model:

* ``main``: every sample through the main BN (the default, in train and eval mode alike);
* ``aux``: every sample through the auxiliary BN;
* ``split``: the first ``split_size`` samples through the main BN, the rest through the auxiliary.

The wrapped layer keeps doing the normalisation, so synchronised BN, timm's fused activation and
drop layers all behave as before; the auxiliary copy shares the activation and drop modules, so
both routes apply the same ones. ``convert_sync_batchnorm`` (timm's or torch's) converts the two
layers inside the wrapper, and ``timm.utils.distribute_bn`` finds both sets of running statistics.

State-dict layout follows timm's ``SplitBatchNorm2d``: the main BN's entries keep the original key
names (``stem.bn.weight``) and the auxiliary ones sit under ``aux_bn.0`` (``stem.bn.aux_bn.0.weight``),
so removing every key that contains ``aux_bn`` (as ``strip_aux_bn`` and timm's
``clean_checkpoint.py --clean-aux-bn`` do) leaves a state dict of the original architecture.
"""
import copy
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .transparent import register_transparent_child

__all__ = [
    'ROUTES', 'AUX_BN_KEY', 'DualBatchNorm2d', 'convert_dual_bn', 'strip_aux_bn', 'aux_bn_state_dict',
    'set_dual_bn_route', 'dual_bn_route', 'dual_bn_layers',
]

ROUTES = ('main', 'aux', 'split')
#: Marker of auxiliary entries in a state dict, the same as timm's ``clean_checkpoint.py --clean-aux-bn``.
AUX_BN_KEY = 'aux_bn'
_MAIN = 'main_bn'

StateDict = Mapping[str, torch.Tensor]
ModelOrStateDict = TypeVar('ModelOrStateDict', nn.Module, Dict[str, torch.Tensor])


def _copy_norm(bn: nn.Module) -> nn.Module:
    """An independent copy of ``bn`` (weights, running statistics) sharing its activation and drop."""
    shared = {name: getattr(bn, name) for name in ('act', 'drop') if isinstance(getattr(bn, name, None), nn.Module)}
    return copy.deepcopy(bn, memo={id(m): m for m in shared.values()})


class DualBatchNorm2d(nn.Module):
    """A BatchNorm layer with an auxiliary copy, routed per sample by a model-wide setting.

    Args:
        bn: The norm layer to wrap (any ``torch.nn.modules.batchnorm._BatchNorm``, including timm's
            ``BatchNormAct2d`` and ``SyncBatchNorm`` variants); it becomes the main BN.
        aux_bn: The auxiliary layer; by default a copy of ``bn`` (weights and running statistics)
            that shares ``bn``'s activation and drop modules.

    Example:
        >>> layer = DualBatchNorm2d(nn.BatchNorm2d(8))
        >>> layer.route, layer.split_size = 'split', 4
        >>> y = layer(torch.randn(6, 8, 4, 4))  # samples 0-3 main BN, 4-5 auxiliary BN
    """

    def __init__(self, bn: nn.Module, aux_bn: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f'DualBatchNorm2d wraps a BatchNorm layer, got {type(bn).__name__}.')
        self.main_bn = bn
        self.aux_bn = nn.ModuleList([_copy_norm(bn) if aux_bn is None else aux_bn])
        self.route = 'main'
        self.split_size: Optional[int] = None
        register_transparent_child(self, _MAIN, apart=(AUX_BN_KEY,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route == 'main':
            return self.main_bn(x)
        if self.route == 'aux':
            return self.aux_bn[0](x)
        n = self.split_size
        if n is None or not 0 <= n <= x.shape[0]:
            raise ValueError(f'Split route needs 0 <= split_size <= batch size, got {n} for a batch of {x.shape[0]}.')
        if n == x.shape[0]:
            return self.main_bn(x)
        if n == 0:
            return self.aux_bn[0](x)
        return torch.cat([self.main_bn(x[:n]), self.aux_bn[0](x[n:])])

    def extra_repr(self) -> str:
        return f'route={self.route}' + (f', split_size={self.split_size}' if self.route == 'split' else '')


def dual_bn_layers(model: nn.Module) -> List[DualBatchNorm2d]:
    """Every :class:`DualBatchNorm2d` in ``model``."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]


def convert_dual_bn(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm in ``module`` by a :class:`DualBatchNorm2d` wrapping it.

    The model keeps its parameters (the main BNs are the original layers) and gains one auxiliary
    BN per layer, initialised as a copy, so pretrained weights are preserved on both routes. Layers
    that are already dual are left alone. Like timm's converters it works in place and returns the
    (possibly new) root module.

    Example:
        >>> model = convert_dual_bn(timm.create_model('resnet10t'))
        >>> with dual_bn_route(model, 'aux'):
        ...     logits_aux = model(x)
    """
    if isinstance(module, DualBatchNorm2d):
        return module
    if isinstance(module, _BatchNorm):
        return DualBatchNorm2d(module)
    for name, child in module.named_children():
        converted = convert_dual_bn(child)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _strip_module(module: nn.Module, keep: str) -> nn.Module:
    if isinstance(module, DualBatchNorm2d):
        return module.main_bn if keep == 'main' else module.aux_bn[0]
    for name, child in module.named_children():
        stripped = _strip_module(child, keep)
        if stripped is not child:
            module.add_module(name, stripped)
    return module


def strip_aux_bn(model_or_state_dict: ModelOrStateDict, keep: str = 'main') -> ModelOrStateDict:
    """Removes the auxiliary BNs: the plain model, or the state dict of the plain model.

    A module is changed in place (each :class:`DualBatchNorm2d` is replaced by its main BN, so eval
    outputs are unchanged bit for bit); copy it first to keep training. A state dict is returned
    as a new dict without the ``aux_bn`` entries, loadable strictly into ``timm.create_model(arch)``.

    Args:
        model_or_state_dict: A dual-BN model or its state dict.
        keep: ``main`` keeps the main BNs (the default); ``aux`` puts the auxiliary BNs in their place
            (AdvBN's adversarial BNs, for a model meant for style-shifted inputs).

    Example:
        >>> plain = strip_aux_bn(copy.deepcopy(dual_model))
        >>> timm.create_model('resnet10t').load_state_dict(strip_aux_bn(dual_model.state_dict()))
    """
    if keep not in ('main', 'aux'):
        raise ValueError(f"strip_aux_bn keeps the 'main' or the 'aux' BNs, got {keep!r}.")
    if isinstance(model_or_state_dict, nn.Module):
        return _strip_module(model_or_state_dict, keep)
    plain = {k: v for k, v in model_or_state_dict.items() if not _is_aux_key(k)}
    if keep == 'aux':
        marker = f'{AUX_BN_KEY}.0.'
        plain.update({k.replace(marker, '', 1): v for k, v in model_or_state_dict.items() if _is_aux_key(k)})
    return plain


def aux_bn_state_dict(model_or_state_dict: Union[nn.Module, StateDict]) -> Dict[str, torch.Tensor]:
    """Only the auxiliary BN entries of a dual-BN state dict (what :func:`strip_aux_bn` removes)."""
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    return {k: v for k, v in model_or_state_dict.items() if _is_aux_key(k)}


def _is_aux_key(key: str) -> bool:
    return f'.{AUX_BN_KEY}.' in f'.{key}'


def _check_route(route: str, split_size: Optional[int]) -> None:
    if route not in ROUTES:
        raise ValueError(f'Unknown BN route {route!r}; choose one of {", ".join(ROUTES)}.')
    if route == 'split' and (split_size is None or split_size < 0):
        raise ValueError(f'The split route needs split_size >= 0 (samples sent to the main BN), got {split_size}.')


def set_dual_bn_route(model: nn.Module, route: str, split_size: Optional[int] = None) -> int:
    """Sets the route of every :class:`DualBatchNorm2d` in ``model``; returns how many were set.

    Args:
        model: A model converted with :func:`convert_dual_bn` (DDP wrappers included).
        route: ``main``, ``aux`` or ``split``.
        split_size: For ``split``, the number of leading samples that go through the main BN.
    """
    _check_route(route, split_size)
    layers = dual_bn_layers(model)
    if not layers:
        raise ValueError('The model has no DualBatchNorm2d layers; convert it with convert_dual_bn first.')
    for m in layers:
        m.route, m.split_size = route, split_size if route == 'split' else None
    return len(layers)


@contextmanager
def dual_bn_route(model: nn.Module, route: str, split_size: Optional[int] = None) -> Iterator[nn.Module]:
    """Context manager routing every :class:`DualBatchNorm2d` of ``model``, restored on exit.

    Example:
        >>> with dual_bn_route(model, 'split', split_size=clean.shape[0]):
        ...     out_clean, out_adv = model(torch.cat([clean, adv])).split(clean.shape[0])
    """
    _check_route(route, split_size)
    saved: List[Tuple[DualBatchNorm2d, str, Optional[int]]] = [(m, m.route, m.split_size) for m in dual_bn_layers(model)]
    try:
        set_dual_bn_route(model, route, split_size)
        yield model
    finally:
        for m, r, s in saved:
            m.route, m.split_size = r, s

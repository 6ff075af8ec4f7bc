"""AdvBN's cut point in a timm CNN: run the front once, then only the back, from any feature.

AdvBN (Shu et al., NeurIPS 2021) perturbs the statistics of the feature map after an early stage
and trains the rest of the network (the *back*) on it, with clean and adversarial copies of every
BatchNorm in the back. :func:`insert_advbn` wraps the module that produces that feature map (the
stage named as in the model's ``feature_info``) in an :class:`AdvBN` layer and makes the back's
BNs dual (:class:`~timm_adv.layers.DualBatchNorm2d`); no model forward is rewritten:

* :meth:`AdvBN.front` runs the model until the cut and stops there (the rest is not run);
* :meth:`AdvBN.back` runs the model with every module that runs before the cut short-circuited
  (it returns its input without computing) and the cut returning the given feature, so only the
  layers after the cut do work. Which modules run before the cut is found once, by tracing a
  forward, and :func:`insert_advbn` checks that ``back(front(x))`` equals ``model(x)``.

Outside those two calls the layer is transparent: the wrapped model's outputs and state-dict keys
are the plain model's (``layer1.0.conv1.weight``), so checkpoints load into plain timm.
"""
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm_adv.utils.errors import ParameterError

from .dual_batchnorm import convert_dual_bn, dual_bn_layers
from .transparent import register_transparent_child

__all__ = ['AdvBN', 'insert_advbn', 'strip_advbn', 'get_advbn', 'advbn_stages']


class _FrontDone(Exception):
    """Carries the cut feature out of a forward that :meth:`AdvBN.front` stops at the cut."""

    def __init__(self, feature: torch.Tensor):
        super().__init__()
        self.feature = feature


def _passthrough(x, *args, **kwargs):
    return x


class AdvBN(nn.Module):
    """The cut point of AdvBN: wraps the module whose output is perturbed; transparent otherwise.

    Args:
        module: The wrapped module (the stage named by ``feature_info``).
        front: Names (from the model root) of the outermost modules that run before it.
        stage: The stage name, for messages.
        relu: The feature is a ReLU output, so the perturbed one is passed through ReLU too.

    Example:
        >>> model = insert_advbn(timm.create_model('resnet10t', num_classes=10), after='layer1', input_size=(3, 32, 32))
        >>> advbn = get_advbn(model)
        >>> f = advbn.front(model, x)        # stem + layer1 only
        >>> logits = advbn.back(model, f)    # layer2..4 + head only; equals model(x)
    """

    def __init__(self, module: nn.Module, front: Sequence[str] = (), stage: str = '', relu: bool = False):
        super().__init__()
        self.module = module
        self.front_names = tuple(front)
        self.stage = stage
        self.relu = relu
        self._stop = False
        self._feature: Optional[torch.Tensor] = None
        register_transparent_child(self, 'module')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._feature is not None:
            return self._feature
        out = self.module(x)
        if self._stop:
            raise _FrontDone(out)
        return out

    def front_modules(self, model: nn.Module) -> List[nn.Module]:
        """The modules that compute the cut feature: those before the cut, and the cut itself."""
        return [model.get_submodule(name) for name in self.front_names] + [self.module]

    def front(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The cut feature of ``x``: ``model`` runs up to this layer and stops."""
        self._stop = True
        try:
            model(x)
        except _FrontDone as done:
            return done.feature
        finally:
            self._stop = False
        raise RuntimeError(f'The forward of {type(model).__name__} never reached the AdvBN cut at {self.stage!r}.')

    @contextmanager
    def feeding(self, model: nn.Module, feature: torch.Tensor) -> Iterator[nn.Module]:
        """Within the context, ``model(feature)`` runs only the back, starting from ``feature``.

        Use it to run the back through a wrapper of ``model`` (DDP); :meth:`back` is the plain call.
        """
        front = [model.get_submodule(name) for name in self.front_names]
        for m in front:
            m.forward = _passthrough  # instance attribute: the module's __call__ now returns its input
        self._feature = feature
        try:
            yield model
        finally:
            self._feature = None
            for m in front:
                del m.forward

    def back(self, model: nn.Module, feature: torch.Tensor) -> torch.Tensor:
        """``model``'s output when the cut produces ``feature``, computing only the layers after the cut."""
        with self.feeding(model, feature):
            return model(feature)

    def extra_repr(self) -> str:
        return f'stage={self.stage!r}, relu={self.relu}, front={list(self.front_names)}'


def advbn_stages(model: nn.Module) -> List[str]:
    """The stage names :func:`insert_advbn` accepts: the modules of the model's ``feature_info``."""
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(f'{type(model).__name__} has no feature_info, so AdvBN cannot find its stages; use a timm '
                         f'CNN (resnet, regnet, efficientnet, mobilenetv3, convnext).')
    return [f['module'] for f in info]


def _resolve_stage(model: nn.Module, after: Union[str, int, None]) -> Tuple[str, int]:
    stages = advbn_stages(model)
    info = model.feature_info
    if after is None:
        # the paper's cut=1 is after ResNet's layer1: the first stage at stride 4
        index = next((i for i, f in enumerate(info) if f.get('reduction', 0) >= 4), 0)
    elif isinstance(after, int) or str(after).isdigit():
        index = int(after)
        if not 0 <= index < len(stages):
            raise ParameterError('after', f'{after}: {type(model).__name__} has {len(stages)} stages, choose an '
                                          f'index 0..{len(stages) - 1} or a name: {", ".join(stages)}.')
    elif after in stages:
        index = stages.index(after)
    else:
        raise ParameterError('after', f'{after!r}: {type(model).__name__} has no such stage; choose one of its '
                                      f'feature_info stages: {", ".join(stages)} (or their index).')
    return stages[index], info[index].get('num_chs')


def _trace(model: nn.Module, cut: str, x: torch.Tensor):
    """Call order of every module around the cut, the cut's output and the model's output."""
    events: List[Tuple[str, bool]] = []
    captured: Dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: events.append((name, False))))
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: events.append((name, True))))
    handles.append(model.get_submodule(cut).register_forward_hook(
        lambda mod, args, out: captured.setdefault('feature', out)))
    try:
        output = model(x)
    finally:
        for h in handles:
            h.remove()
    return events, captured.get('feature'), output


def _front_names(events: List[Tuple[str, bool]], cut: str) -> List[str]:
    """The outermost modules whose every call ends before the cut starts."""
    starts = [i for i, (name, end) in enumerate(events) if name == cut and not end]
    if len(starts) != 1:
        raise ValueError(f'AdvBN needs the cut module {cut!r} to run once per forward, it ran {len(starts)} times.')
    cut_start = starts[0]
    before = {name for name, _ in events[:cut_start]}
    after = {name for name, _ in events[cut_start:]}
    front = before - after
    return sorted(n for n in front if not any(n.startswith(f + '.') for f in front))


def _convert_back(module: nn.Module, skip: Sequence[str], prefix: str = '') -> None:
    """Dual BNs for every BN outside the ``skip`` subtrees (the front and the cut)."""
    for name, child in module.named_children():
        full = prefix + name
        if full in skip:
            continue
        if any(s.startswith(full + '.') for s in skip):
            _convert_back(child, skip, full + '.')
        else:
            converted = convert_dual_bn(child)
            if converted is not child:
                module.add_module(name, converted)


def insert_advbn(
        model: nn.Module,
        after: Union[str, int, None] = None,
        input_size: Optional[Sequence[int]] = None,
        relu: Optional[bool] = None,
        dual_bn: bool = True,
) -> nn.Module:
    """Puts an :class:`AdvBN` cut after a stage of a timm CNN and gives the back dual BNs.

    The model's eval outputs do not change (checked). In place, like timm's converters; returns the model.

    Args:
        model: A timm CNN with ``feature_info`` (ResNet, RegNet, EfficientNet, MobileNetV3, ConvNeXt...).
        after: Stage name from ``feature_info`` (``layer1``, ``blocks.1``, ``s1``, ``stages.0``) or its
            index; default the first stage at stride 4 (the paper's cut after ResNet's layer1).
        input_size: ``(C, H, W)`` of the trace that finds the front (default: the model's ``pretrained_cfg``).
        relu: Pass the perturbed feature through ReLU; default: when the traced feature is non-negative
            (it came out of a ReLU, as in ResNet).
        dual_bn: Convert the BNs after the cut to :class:`DualBatchNorm2d` (clean + adversarial copies).
            A model without BN after the cut (ConvNeXt) gets a warning and trains without them.

    Raises:
        ValueError: Unknown stage (the valid ones are listed), a token model (ViT, MLP-Mixer) or a
            model whose forward cannot be split at the cut.

    Example:
        >>> model = insert_advbn(timm.create_model('resnet10t'), after='layer1', input_size=(3, 32, 32))
    """
    if get_advbn(model) is not None:
        raise ValueError('The model already has an AdvBN layer; strip_advbn() it first.')
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    stage, num_chs = _resolve_stage(model, after)
    input_size = tuple(input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    param = next(model.parameters())
    x = torch.randn(2, *input_size, device=param.device, dtype=param.dtype)
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            events, feature, reference = _trace(model, stage, x)
            if not isinstance(feature, torch.Tensor) or feature.ndim != 4 or feature.shape[1] != num_chs:
                shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
                raise ValueError(
                    f'--adv-method advbn perturbs the per-channel statistics of an N x C x H x W feature map, but '
                    f'{arch!r} gives {shape} at {stage!r} (a token model such as ViT or MLP-Mixer, or channels-last '
                    f'features). Use a CNN (resnet, regnet, efficientnet, mobilenetv3, convnext), or another '
                    f'method such as --adv-method pgd.')
            front = _front_names(events, stage)
            parent_name, _, child_name = stage.rpartition('.')
            layer = AdvBN(model.get_submodule(stage), front, stage=stage,
                          relu=bool(feature.min() >= 0) if relu is None else relu)
            model.get_submodule(parent_name).add_module(child_name, layer)
            split = layer.back(model, feature)
            tol = 1e-4 * (1.0 + float(reference.abs().max()))
            if split.shape != reference.shape or not torch.allclose(split, reference, rtol=0, atol=tol):
                strip_advbn(model)
                raise ValueError(
                    f'{arch!r} cannot be split at {stage!r}: running only the layers after it does not reproduce the '
                    f'model output (its forward computes outside modules before the cut). Pick another '
                    f'--adv-advbn-stage or another method.')
    finally:
        for m, was_training in training:
            m.training = was_training
    if dual_bn:
        _convert_back(model, (*front, stage))
        if not dual_bn_layers(model):
            warnings.warn(f'{arch!r} has no BatchNorm after {stage!r} (e.g. ConvNeXt: LayerNorm): AdvBN perturbs the '
                          f'feature statistics and trains without clean/adversarial BN copies.', stacklevel=2)
    return model


def get_advbn(model: nn.Module) -> Optional[AdvBN]:
    """The :class:`AdvBN` layer of ``model``, or None."""
    return next((m for m in model.modules() if isinstance(m, AdvBN)), None)


def strip_advbn(model: nn.Module) -> nn.Module:
    """Removes the :class:`AdvBN` layer (in place), leaving the wrapped module where it was.

    Dual BNs stay; remove them with :func:`~timm_adv.layers.strip_aux_bn`.

    Example:
        >>> plain = strip_aux_bn(strip_advbn(copy.deepcopy(model)))
    """
    if isinstance(model, AdvBN):
        return model.module
    for name, child in model.named_modules():
        if isinstance(child, AdvBN):
            parent_name, _, child_name = name.rpartition('.')
            model.get_submodule(parent_name).add_module(child_name, child.module)
            break
    return model

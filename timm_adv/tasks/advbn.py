"""AdvBN: adversarial perturbation of feature statistics after an early stage (Shu et al., NeurIPS 2021).

The model is cut after a stage (:func:`~timm_adv.layers.insert_advbn`); each step:

1. the front (stem + stages up to the cut) runs once, without gradients when frozen (the paper);
2. :class:`~timm_adv.attacks.FeatureStatsAttack` finds per-channel multipliers ``a, b`` of
   ``f_adv = (f - mu) * a + mu * b`` by ``steps`` signed-gradient ascent steps, running only the
   back, in eval mode, through the adversarial BNs;
3. one forward of the back on ``[f, f_adv]`` in train mode, clean half through the clean BNs and
   adversarial half through the adversarial BNs: ``loss = CE(back_clean(f)) + CE(back_adv(f_adv))``.

Defaults, those of the paper and of the official ``azshue/AdvBN`` config: cut after the first
stride-4 stage (ResNet ``layer1``), 6 steps of 0.2, ``eps`` 1.1 (multipliers in [-0.1, 2.1]), frozen front.
Differences from the official code, on purpose: the official code trains only the back's
parameters; with ``--no-adv-advbn-freeze-front`` we also train the front (through both losses).

Checkpoints hold the plain model (clean BNs) under ``state_dict`` and the adversarial BNs under
``task_state['aux_bn']``. Export removes the AdvBN layer and keeps one BN set, the clean one by
default (the paper's ImageNet / ImageNet-C model); the model card says which.
"""
import argparse
import copy
import logging
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.data import resolve_data_config

from timm_adv.attacks import FeatureStatsAttack, perturb_feature_stats
from timm_adv.layers import (
    AdvBN, dual_bn_layers, dual_bn_route, get_advbn, insert_advbn, set_dual_bn_route, strip_advbn, strip_aux_bn,
)
from timm_adv.utils.errors import flag_errors

from .arg_types import bounded_type, eps_type
from .aux_bn_state import AuxBNStateMixin
from .base import AdversarialTask, top1
from .registry import register_method

__all__ = ['AdvBNTask']

_logger = logging.getLogger(__name__)

EXPORT_BNS = ('clean', 'adv')
def _freeze(modules) -> None:
    for m in modules:
        m.requires_grad_(False)


@register_method('advbn')
class AdvBNTask(AuxBNStateMixin, AdversarialTask):
    """AdvBN fine-tuning of a CNN with an :class:`~timm_adv.layers.AdvBN` cut and dual BNs after it.

    Args:
        model: A model converted by :meth:`prepare_model` (or :func:`~timm_adv.layers.insert_advbn`).
        criterion: Training loss for both halves.
        attack: The feature-statistics attack (its ``relu`` should match the layer's).
        freeze_front: Freeze the front's parameters and run it without gradients, BN in eval mode (the paper).
        export_bn: BN set kept at export: ``clean`` (default) or ``adv``.

    Example:
        >>> model = insert_advbn(timm.create_model('resnet10t', num_classes=10), input_size=(3, 32, 32))
        >>> task = AdvBNTask(model, nn.CrossEntropyLoss(), FeatureStatsAttack(relu=get_advbn(model).relu))
        >>> task(x, y)['loss'].backward()
        >>> plain = task.export_model()   # plain resnet10t with the clean BNs
    """

    paper = 'Encoding Robustness to Image Style via Adversarial Feature Perturbations (Shu et al., NeurIPS 2021)'
    url = 'https://arxiv.org/abs/2009.08965'
    citation = ('@inproceedings{shu2021encoding,\n  title = {Encoding Robustness to Image Style via Adversarial '
                'Feature Perturbations},\n  author = {Shu, Manli and Wu, Zuxuan and Goldblum, Micah and Goldstein, '
                'Tom},\n  booktitle = {NeurIPS},\n  year = {2021}\n}')

    default_bn_mode = 'eval'
    uses_args = ('adv_bn_mode',)  # the attack perturbs feature statistics, not pixels
    arg_hints = {'adv_eps': '--adv-advbn-eps', 'adv_steps': '--adv-advbn-steps',
                 'adv_step_size': '--adv-advbn-step-size'}
    param_flags = {'eps': '--adv-advbn-eps', 'steps': '--adv-advbn-steps', 'step_size': '--adv-advbn-step-size',
                   'bn_mode': '--adv-bn-mode', 'after': '--adv-advbn-stage'}
    #: No pixel attack: the per-epoch robust validation keeps its own default eps (8/255).
    attack_defaults: Dict[str, Any] = {}
    #: The paper's settings (6 steps of 0.2, multipliers within 1 +- 1.1, frozen front, clean BNs exported).
    flag_defaults = dict(adv_advbn_steps=6, adv_advbn_step_size=0.2, adv_advbn_eps=1.1, adv_advbn_freeze_front=True,
                         adv_advbn_export_bn='clean')

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            attack: FeatureStatsAttack,
            freeze_front: bool = flag_defaults['adv_advbn_freeze_front'],
            export_bn: str = flag_defaults['adv_advbn_export_bn'],
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, attack=attack, device=device, dtype=dtype, verbose=verbose)
        advbn = get_advbn(self.unwrapped_model)
        if advbn is None:
            raise ValueError('AdvBNTask needs a model with an AdvBN layer; convert it with AdvBNTask.prepare_model '
                             '(or timm_adv.layers.insert_advbn) first.')
        self.dual_bn = bool(dual_bn_layers(self.unwrapped_model))
        if export_bn not in EXPORT_BNS:
            raise ValueError(f'--adv-advbn-export-bn must be one of {", ".join(EXPORT_BNS)}, got {export_bn!r}.')
        if export_bn == 'adv' and not self.dual_bn:
            raise ValueError('--adv-advbn-export-bn adv: this model has no BatchNorm after the cut, so there are no '
                             'adversarial BNs to export; use --adv-advbn-export-bn clean.')
        self.freeze_front = freeze_front
        self.export_bn = export_bn
        if freeze_front:
            _freeze(advbn.front_modules(self.unwrapped_model))
        if verbose:
            _logger.info(f'AdvBN: cut after {advbn.stage!r} (front: {", ".join(advbn.front_names) or "-"}), '
                         f'{"frozen" if freeze_front else "trained"} front, '
                         f'{len(dual_bn_layers(self.unwrapped_model))} dual BNs after the cut, {attack!r}.')

    @property
    def advbn(self) -> AdvBN:
        """The model's AdvBN layer (looked up, not registered: the task must not own model weights twice)."""
        return get_advbn(self.unwrapped_model)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.flag_defaults
        group.add_argument('--adv-advbn-stage', default=None, metavar='STAGE',
                           help="advbn: cut after this feature_info stage, by name (layer1, blocks.1, s1, stages.0) "
                                "or index (default: the first stride-4 stage, the paper's ResNet layer1)")
        group.add_argument('--adv-advbn-steps', type=bounded_type('--adv-advbn-steps', int, 1),
                           default=d['adv_advbn_steps'], metavar='K',
                           help='advbn: signed-gradient ascent steps on the multipliers (default: %(default)s)')
        group.add_argument('--adv-advbn-step-size', type=eps_type('--adv-advbn-step-size'),
                           default=d['adv_advbn_step_size'], metavar='S',
                           help='advbn: ascent step size (default: %(default)s)')
        group.add_argument('--adv-advbn-eps', type=eps_type('--adv-advbn-eps'), default=d['adv_advbn_eps'],
                           metavar='EPS', help='advbn: multipliers stay in [1-EPS, 1+EPS] (default: %(default)s)')
        group.add_argument('--adv-advbn-freeze-front', action=argparse.BooleanOptionalAction,
                           default=d['adv_advbn_freeze_front'],
                           help='advbn: run the layers up to the cut without gradients, BN in eval mode, as the '
                                'paper (default: frozen)')
        group.add_argument('--adv-advbn-relu', action=argparse.BooleanOptionalAction, default=None,
                           help='advbn: ReLU after the perturbation (default: when the cut feature is non-negative, '
                                'i.e. a ReLU output as in ResNet)')
        group.add_argument('--adv-advbn-export-bn', choices=EXPORT_BNS, default=d['adv_advbn_export_bn'],
                           help='advbn: BN set kept by the export: clean (the paper\'s ImageNet / ImageNet-C model) or '
                                'adv (its Stylized-ImageNet / Sketch model) (default: %(default)s)')

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuses gradient checkpointing; warns when not fine-tuning (the pixel-attack flags are refused by
        ``check_adv_args``: ``uses_args``)."""
        if getattr(args, 'grad_checkpointing', False):
            # a checkpointed segment is recomputed in the backward, outside the back-only pass that feeds the
            # cut its (perturbed) feature: the gradients of the multipliers would be those of another graph
            raise ValueError('--grad-checkpointing does not work with --adv-method advbn (the attack and training '
                             'passes run only the layers after the cut); drop it, or lower --batch-size.')
        if not any(getattr(args, k, None) for k in ('pretrained', 'pretrained_path', 'initial_checkpoint', 'resume')):
            warnings.warn('--adv-method advbn without --pretrained (or --initial-checkpoint): the paper fine-tunes a '
                          'trained model for a few epochs; from random weights the frozen front stays random.',
                          stacklevel=2)

    @classmethod
    def prepare_model(cls, model: nn.Module, args: argparse.Namespace) -> nn.Module:
        """Inserts the AdvBN cut (dual BNs after it) and freezes the front unless told otherwise."""
        input_size = resolve_data_config(vars(args), model=model)['input_size']
        with flag_errors(cls.param_flags):
            model = insert_advbn(model, after=getattr(args, 'adv_advbn_stage', None), input_size=input_size,
                                 relu=getattr(args, 'adv_advbn_relu', None))
        if cls.setting(args, 'adv_advbn_freeze_front'):
            _freeze(get_advbn(model).front_modules(model))  # before the optimiser is built, so it leaves them out
        return model

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'AdvBNTask':
        attack = FeatureStatsAttack(
            eps=cls.setting(args, 'adv_advbn_eps'), steps=cls.setting(args, 'adv_advbn_steps'),
            step_size=cls.setting(args, 'adv_advbn_step_size'), relu=get_advbn(model).relu,
            bn_mode=getattr(args, 'adv_bn_mode', None) or cls.default_bn_mode,
            autocast=getattr(args, 'adv_attack_amp', False))
        return cls(model, criterion, attack, freeze_front=cls.setting(args, 'adv_advbn_freeze_front'),
                   export_bn=cls.setting(args, 'adv_advbn_export_bn'), device=device)

    def ideal_cost(self) -> Dict[str, float]:
        """Counted in whole-model passes, an upper bound: the front runs once and the attack and training
        passes only run the back. ``benchmarks/advbn_cost.py`` measures the front / back split."""
        return {'train_steps': 2.0, 'attack_passes': float(self.attack.steps)}

    def train(self, mode: bool = True) -> 'AdvBNTask':
        super().train(mode)
        if mode and self.freeze_front:
            for m in self.advbn.front_modules(self.unwrapped_model):
                m.eval()
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        model, advbn = self.unwrapped_model, self.advbn
        with torch.no_grad() if self.freeze_front else nullcontext():
            feature = advbn.front(model, input)
        attacked = self.attack_model  # compiled after --torchcompile; the front stays eager (run once, no grad)

        def back(f: torch.Tensor) -> torch.Tensor:
            with advbn.feeding(model, f):
                return attacked(f)

        with dual_bn_route(model, 'aux') if self.dual_bn else nullcontext():
            a, b = self.attack.perturb(attacked, back, feature, target)
        features = torch.cat([feature, perturb_feature_stats(feature, a, b, relu=self.attack.relu)])
        n = input.shape[0]
        with dual_bn_route(model, 'split', split_size=n) if self.dual_bn else nullcontext(), \
                advbn.feeding(model, features):
            output_clean, output_adv = self.trainable_module(features).split(n)
        loss_clean = self.criterion(output_clean, target)
        loss_adv = self.criterion(output_adv, target)
        return {
            'loss': loss_clean + loss_adv, 'output': output_clean, 'loss_clean': loss_clean.detach(),
            'loss_adv': loss_adv.detach(), 'top1_clean': top1(output_clean, target),
            'top1_adv': top1(output_adv, target),
        }

    def export_model(self) -> nn.Module:
        """A copy without the AdvBN layer and with one BN set: the original timm architecture."""
        plain = strip_advbn(copy.deepcopy(self.unwrapped_model))
        return strip_aux_bn(plain, keep='main' if self.export_bn == 'clean' else 'aux') if self.dual_bn else plain

    def export_reference(self) -> nn.Module:
        """The trained model routed through the BN set the export keeps."""
        if self.export_bn == 'clean':
            return self.unwrapped_model
        reference = copy.deepcopy(self.unwrapped_model)
        set_dual_bn_route(reference, 'aux')
        return reference

    def card_details(self) -> Dict[str, str]:
        if self.export_bn == 'clean':
            return {'Exported weights': 'AdvBN layer removed; the clean BatchNorms are kept and the adversarial ones dropped (the paper '
                    'evaluates ImageNet and ImageNet-C this way).'}
        return {'Exported weights': 'AdvBN layer removed; the adversarial BatchNorms are kept in place of the '
                'clean ones (the paper evaluates Stylized-ImageNet and Sketch this way; clean accuracy may be lower).'}

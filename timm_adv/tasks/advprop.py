"""AdvProp: adversarial examples as extra training data through auxiliary BatchNorms (Xie et al., CVPR 2020).

Each step attacks the network routed through its auxiliary BNs, then runs one forward of the clean
and adversarial batches together, clean samples through the main BNs and adversarial ones through
the auxiliary BNs, with ``loss = w_clean * CE(clean) + w_adv * CE(adv)``.

Defaults and where they come from (the paper, and the PyTorch port its authors advised on):

* PGD L-inf, eps 1/255, step 1/255, ``eps * 255 + 1`` steps (1 step at eps = 1/255) (paper).
* Targeted toward a uniformly drawn wrong class, random start, the model in eval mode with the
  auxiliary running statistics (``--adv-bn-mode eval``): the PyTorch port written with the
  authors' guidance. ``--adv-targeted none`` gives Fast AdvProp's untargeted attack.
* ``w_clean = w_adv = 1``: the paper's ``L = L_clean + L_adv``. One cross-entropy over the
  concatenated batch, as in the PyTorch port, is ``(L_clean + L_adv) / 2``: set both weights to
  0.5 (or halve the learning rate) to reproduce it.

Checkpoints written by timm's ``CheckpointSaver`` hold the plain model under ``state_dict`` (so
``model_best.pth.tar`` loads strictly into ``timm.create_model``) and the auxiliary BNs under
``task_state['aux_bn']`` (so ``--resume`` restores them).
"""
import argparse
import copy
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from timm_adv.attacks import PGDAttack
from timm_adv.layers import convert_dual_bn, dual_bn_layers, dual_bn_route, strip_aux_bn
from .arg_types import bounded_type
from .aux_bn_state import AuxBNStateMixin
from .base import AdversarialTask, top1
from .registry import register_method

__all__ = ['AdvPropTask', 'advprop_steps']

_ALTERNATIVES = '--adv-method pgd (or none for plain training)'


def advprop_steps(eps: float) -> int:
    """The paper's attack length: ``n = eps + 1`` steps with eps in 1/255 units, 1 step at eps = 1/255.

    Example:
        >>> advprop_steps(4 / 255)
        5
    """
    k = max(1, round(eps * 255))
    return 1 if k == 1 else k + 1


@register_method('advprop')
class AdvPropTask(AuxBNStateMixin, AdversarialTask):
    """AdvProp training of a BatchNorm model with auxiliary BNs for the adversarial examples.

    Args:
        model: A model converted by :meth:`prepare_model` (every BN a ``DualBatchNorm2d``).
        criterion: Training loss for both halves (soft targets from mixup / cutmix work).
        attack: The PGD attack, run through the auxiliary BNs.
        clean_weight: Weight of the clean loss (main BNs).
        adv_weight: Weight of the adversarial loss (auxiliary BNs).

    Example:
        >>> model = AdvPropTask.prepare_model(timm.create_model('resnet10t'), args)
        >>> attack = PGDAttack(eps=1 / 255, steps=1, step_size=1 / 255, targeted='random', mean=mean, std=std)
        >>> task = AdvPropTask(model, nn.CrossEntropyLoss(), attack)
        >>> task(x, y)['loss'].backward()
        >>> plain = task.export_model()  # the original timm architecture, auxiliary BNs dropped
    """

    paper = 'Adversarial Examples Improve Image Recognition (Xie et al., CVPR 2020)'
    url = 'https://arxiv.org/abs/1911.09665'
    citation = ('@inproceedings{xie2020adversarial,\n  title = {Adversarial Examples Improve Image Recognition},\n'
                '  author = {Xie, Cihang and Tan, Mingxing and Gong, Boqing and Wang, Jiang and Yuille, Alan L. and '
                'Le, Quoc V.},\n  booktitle = {CVPR},\n  year = {2020}\n}')

    default_bn_mode = 'eval'
    #: The paper's loss: CE(clean, main BN) + CE(adversarial, auxiliary BN).
    flag_defaults = dict(adv_advprop_clean_weight=1.0, adv_advprop_adv_weight=1.0)
    attack_defaults: Dict[str, Any] = dict(
        eps=1 / 255, steps=advprop_steps, step_size=1 / 255, norm='linf', random_start=True, targeted='random')

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            attack: PGDAttack,
            clean_weight: float = flag_defaults['adv_advprop_clean_weight'],
            adv_weight: float = flag_defaults['adv_advprop_adv_weight'],
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, attack=attack, device=device, dtype=dtype, verbose=verbose)
        if not dual_bn_layers(self.unwrapped_model):
            raise ValueError('AdvPropTask needs a model with auxiliary BNs; convert it with '
                             'AdvPropTask.prepare_model (or timm_adv.layers.convert_dual_bn) first.')
        if clean_weight < 0 or adv_weight < 0 or clean_weight + adv_weight == 0:
            raise ValueError(f'--adv-advprop-clean-weight and --adv-advprop-adv-weight must be >= 0 and not both 0, '
                             f'got {clean_weight} and {adv_weight}.')
        self.clean_weight = clean_weight
        self.adv_weight = adv_weight

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument('--adv-advprop-clean-weight', type=bounded_type('--adv-advprop-clean-weight', float, 0),
                           default=cls.flag_defaults['adv_advprop_clean_weight'], metavar='W',
                           help='advprop: weight of CE(clean, main BN); 1 as in the paper, 0.5 with the adv weight '
                                '0.5 is the PyTorch port\'s single CE over both halves (default: %(default)s)')
        group.add_argument('--adv-advprop-adv-weight', type=bounded_type('--adv-advprop-adv-weight', float, 0),
                           default=cls.flag_defaults['adv_advprop_adv_weight'], metavar='W',
                           help='advprop: weight of CE(adversarial, auxiliary BN) (default: %(default)s)')

    @classmethod
    def prepare_model(cls, model: nn.Module, args: Optional[argparse.Namespace] = None) -> nn.Module:
        """Gives every BatchNorm an auxiliary copy; refuses models without BatchNorm."""
        model = convert_dual_bn(model)
        if not dual_bn_layers(model):
            name = getattr(args, 'model', None) or type(model).__name__
            raise ValueError(
                f'--adv-method advprop needs BatchNorm layers to give the adversarial examples auxiliary BNs, but '
                f'{name!r} has none (e.g. LayerNorm / GroupNorm models such as ViT or ConvNeXt). Use a BatchNorm '
                f'model (resnet, efficientnet, mobilenetv3, regnet) or another method: {_ALTERNATIVES}.')
        return model

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'AdvPropTask':
        return cls(model, criterion, attack=cls.attack_from_args(args, mean, std),
                   clean_weight=cls.setting(args, 'adv_advprop_clean_weight'),
                   adv_weight=cls.setting(args, 'adv_advprop_adv_weight'), device=device)

    def ideal_cost(self) -> Dict[str, float]:
        cost = super().ideal_cost()
        cost['train_steps'] = 2.0  # one training step on the clean + adversarial (2x) batch
        return cost

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        dual = self.unwrapped_model
        with dual_bn_route(dual, 'aux'):
            x_adv = self.attack(self.trainable_module, input, target)
        n = input.shape[0]
        with dual_bn_route(dual, 'split', split_size=n):
            output_clean, output_adv = self.trainable_module(torch.cat([input, x_adv])).split(n)
        loss_clean = self.criterion(output_clean, target)
        loss_adv = self.criterion(output_adv, target)
        loss = self.clean_weight * loss_clean + self.adv_weight * loss_adv
        return {
            'loss': loss, 'output': output_clean, 'loss_clean': loss_clean.detach(), 'loss_adv': loss_adv.detach(),
            'top1_clean': top1(output_clean, target), 'top1_adv': top1(output_adv, target),
        }

    def export_model(self) -> nn.Module:
        """A copy of the trained model without auxiliary BNs: the original timm architecture."""
        return strip_aux_bn(copy.deepcopy(self.unwrapped_model))

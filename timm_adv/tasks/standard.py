"""Plain training and Madry PGD adversarial training (FGSM with one step)."""
import argparse
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from timm_adv.attacks import PGDAttack
from .base import AdversarialTask, top1
from .registry import register_method

__all__ = ['StandardTask', 'PGDTrainingTask']


@register_method('none')
class StandardTask(AdversarialTask):
    """Plain timm classification training (no attack), the baseline every method is compared to.

    It reports the loss only, like timm's classification task, so ``summary.csv`` has timm's columns.
    """

    paper = 'Standard training (no adversarial examples)'

    uses_args = ()

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'StandardTask':
        return cls(model, criterion, attack=None, device=device)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output = self.trainable_module(input)
        loss = self.criterion(output, target)
        return {'loss': loss, 'output': output}


@register_method('pgd')
class PGDTrainingTask(AdversarialTask):
    """Madry PGD adversarial training; FGSM training is ``--adv-steps 1``.

    The attack runs with batch statistics and frozen running statistics by default
    (``--adv-bn-mode train``). With ``clean_weight > 0`` the loss mixes clean and adversarial
    examples, ``(1 - w) * CE(adv) + w * CE(clean)``, from one forward of the concatenated batch.

    Args:
        model: Model to train.
        criterion: Training loss.
        attack: The PGD attack making training examples.
        clean_weight: Weight ``w`` of the clean loss (0 is pure adversarial training).

    Example:
        >>> attack = PGDAttack(eps=8 / 255, steps=10, bn_mode='train', mean=mean, std=std)
        >>> task = PGDTrainingTask(model, nn.CrossEntropyLoss(), attack)
        >>> task(x, y)['loss'].backward()
    """

    paper = 'Towards Deep Learning Models Resistant to Adversarial Attacks (Madry et al., ICLR 2018)'
    url = 'https://arxiv.org/abs/1706.06083'
    citation = ('@inproceedings{madry2018towards,\n  title = {Towards Deep Learning Models Resistant to Adversarial '
                'Attacks},\n  author = {Madry, Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, '
                'Dimitris and Vladu, Adrian},\n  booktitle = {ICLR},\n  year = {2018}\n}')
    #: Madry et al. train on adversarial examples only.
    flag_defaults = dict(adv_clean_weight=0.0)

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            attack: PGDAttack,
            clean_weight: float = flag_defaults['adv_clean_weight'],
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, attack=attack, device=device, dtype=dtype, verbose=verbose)
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f'--adv-clean-weight must be in [0, 1], got {clean_weight}.')
        self.clean_weight = clean_weight

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument('--adv-clean-weight', type=float, default=cls.flag_defaults['adv_clean_weight'],
                           metavar='W',
                           help='pgd: weight of the clean loss, (1-W)*CE(adv) + W*CE(clean) (default: %(default)s)')

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'PGDTrainingTask':
        return cls(model, criterion, attack=cls.attack_from_args(args, mean, std),
                   clean_weight=cls.setting(args, 'adv_clean_weight'), device=device)

    def ideal_cost(self) -> Dict[str, float]:
        cost = super().ideal_cost()
        if self.clean_weight > 0:
            cost['train_steps'] = 2.0  # the clean half doubles the trained batch
        return cost

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        x_adv = self.attack(self.trainable_module, input, target)
        if self.clean_weight == 0.0:
            output = self.trainable_module(x_adv)
            loss = self.criterion(output, target)
            return {'loss': loss, 'output': output, 'top1_adv': top1(output, target)}
        output_clean, output = self.trainable_module(torch.cat([input, x_adv])).chunk(2)
        loss_clean = self.criterion(output_clean, target)
        loss_adv = self.criterion(output, target)
        loss = (1.0 - self.clean_weight) * loss_adv + self.clean_weight * loss_clean
        return {
            'loss': loss, 'output': output, 'loss_clean': loss_clean.detach(), 'loss_adv': loss_adv.detach(),
            'top1_clean': top1(output_clean, target), 'top1_adv': top1(output, target),
        }

"""FGSM-RS: FGSM adversarial training with a random start (Wong et al., "Fast is better than free", ICLR 2020).

Per batch: ``delta ~ U(-eps, eps)`` (kept inside [0, 1]), one signed-gradient step of size
``alpha = 1.25 * eps``, projection to the eps ball and [0, 1], then CE on ``x + delta``: about two
forward-backward passes. It is Madry PGD training with one random-start step, so it runs on the
``pgd`` task and the shared attack core; only the defaults differ.
"""
import argparse

from .standard import PGDTrainingTask
from .registry import register_method

__all__ = ['FGSMRSTask', 'FGSM_RS_STEP_RATIO']

#: Wong et al.'s step size relative to eps.
FGSM_RS_STEP_RATIO = 1.25


@register_method('fgsm-rs')
class FGSMRSTask(PGDTrainingTask):
    """Random-start FGSM training: ``pgd`` with one step of ``1.25 * eps`` from a uniform random start.

    ``--adv-step-size`` overrides alpha; ``--adv-clean-weight`` mixes in the clean loss as for ``pgd``.

    Example:
        >>> attack = PGDAttack(eps=8 / 255, steps=1, step_size=10 / 255, random_start=True, mean=mean, std=std)
        >>> task = FGSMRSTask(model, nn.CrossEntropyLoss(), attack)
    """

    paper = 'Fast is better than free: Revisiting adversarial training (Wong et al., ICLR 2020)'
    url = 'https://arxiv.org/abs/2001.03994'
    citation = ('@inproceedings{wong2020fast,\n  title = {Fast is better than free: Revisiting adversarial '
                'training},\n  author = {Wong, Eric and Rice, Leslie and Kolter, J. Zico},\n  booktitle = {ICLR},\n'
                '  year = {2020}\n}')

    uses_args = PGDTrainingTask.uses_args + ('adv_clean_weight',)
    attack_defaults = dict(eps=8 / 255, steps=1, step_size=lambda eps: FGSM_RS_STEP_RATIO * eps, norm='linf',
                           random_start=True)
    #: Fast single-step methods are prone to catastrophic overfitting: guard them by default.
    co_guard_default = True

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """No flags of its own (``--adv-clean-weight`` is registered by ``pgd``)."""

    @classmethod
    def attack_from_args(cls, args: argparse.Namespace, mean=None, std=None):
        if getattr(args, 'adv_steps', None) not in (None, 1):
            raise ValueError(f'fgsm-rs takes a single step, got --adv-steps {args.adv_steps}; use --adv-method pgd '
                             f'for multi-step training.')
        if getattr(args, 'adv_random_start', None) is False:
            raise ValueError('fgsm-rs always starts from a random point; drop --no-adv-random-start (plain FGSM '
                             'training is --adv-method pgd --adv-steps 1 --no-adv-random-start).')
        return super().attack_from_args(args, mean, std)

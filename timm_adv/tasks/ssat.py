"""Stage 2: self-supervised adversarial training (Chen et al., "Self-Supervised Adversarial Training", ICASSP 2020).

Per batch, with the kNN feature bank embedded at the start of the epoch (the paper re-embeds the
training set as the encoder changes; the official notebook does it every batch):

1. reference class: the kNN's prediction on the clean image (stage 2 reads no labels; the
   official notebook uses the training label, which equals it wherever the kNN is right), the
   image's own bank entry excluded from its neighbours (it would vote the true label);
2. kNN-guided PGD against the representation (:class:`~timm_adv.attacks.KNNGuidedAttack`): ``m``
   guides of the nearest wrong class, maximise the log-sum-exp of cosines, random start, L-inf
   (STL-10 recipe: eps 0.03, 10 steps of 0.005); the attack sees eval-mode BN by default, as the
   kNN does; ``--adv-ssat-guide-mode neighbours`` picks the guides as the official notebook does;
3. keep the pairs whose adversarial image fools the kNN;
4. loss: InfoNCE between the clean and the adversarial representation of the kept pairs (each the
   other's positive, every other view of the batch a negative), on the L2-normalised backbone
   features the kNN reads. AMDIM's mutual-information objective acts on its global feature; with a
   timm backbone we apply InfoNCE to the kNN feature directly, with no projection head, so the
   objective shapes exactly what the kNN compares. When no pair is kept the loss is 0 (no update
   beyond weight decay / momentum).

Start from a stage-1 checkpoint, timm's way of loading a backbone without its head:
``--pretrained --pretrained-path <stage1>/last.pth.tar`` (or ``--initial-checkpoint`` together with
``--num-classes 0``); without one the task warns and trains from the initial weights.
"""
import argparse
import logging
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_adv.attacks import GUIDE_MODES, KNNGuidedAttack, PGDAttack, attack_bn_mode
from timm_adv.loss import info_nce
from .arg_types import bounded_type
from .registry import register_method
from .base import ATTACK_ARGS
from .representation import KNN_ARGS, RepresentationTask, bank_loader_from_args, check_label_free_args

__all__ = ['SSATTask']

_logger = logging.getLogger(__name__)


@register_method('ssat')
class SSATTask(RepresentationTask):
    """Self-supervised adversarial training of a feature model (see the module docstring).

    Args:
        model: Feature model (``num_classes=0``), ideally from stage 1.
        bank_loader: Loader over the labelled bank split.
        num_classes: Classes of the bank labels.
        attack: The kNN-guided attack.
        **kwargs: kNN / InfoNCE settings and normalisation of :class:`RepresentationTask`.

    Example:
        >>> attack = create_knn_guided_attack(eps=0.03, steps=10, step_size=0.005, mean=mean, std=std)
        >>> task = SSATTask(model, bank_loader, 10, attack, mean=mean, std=std)
        >>> task.on_epoch_start(0)   # embeds the bank
        >>> task(x, y)['loss'].backward()
    """

    paper = 'Self-Supervised Adversarial Training (Chen et al., ICASSP 2020)'
    url = 'https://arxiv.org/abs/1911.06470'
    citation = ('@inproceedings{chen2020self,\n  title = {Self-Supervised Adversarial Training},\n  author = {Chen, '
                'Kejiang and Chen, Yuefeng and Zhou, Hang and Mao, Xiaofeng and Li, Yuhong and He, Yuan and Xue, '
                'Hui and Zhang, Weiming and Yu, Nenghai},\n  booktitle = {ICASSP},\n  year = {2020}\n}')

    # the guides set the direction of the attack, so --adv-targeted has nothing to choose
    uses_args = tuple(a for a in ATTACK_ARGS if a != 'adv_targeted') + KNN_ARGS

    attack_defaults = dict(eps=0.03, steps=10, step_size=lambda eps: eps / 6, norm='linf', random_start=True)
    param_flags = {**RepresentationTask.param_flags, 'num_guides': '--adv-ssat-guides',
                   'guide_mode': '--adv-ssat-guide-mode'}
    #: The paper's 300 guides, nearest the image.
    flag_defaults = {**RepresentationTask.flag_defaults, 'adv_ssat_guides': 300, 'adv_ssat_guide_mode': 'class'}

    def __init__(self, model: nn.Module, bank_loader, num_classes: int, attack: KNNGuidedAttack, **kwargs):
        super().__init__(model, bank_loader, num_classes, attack=attack, **kwargs)
        self._epoch_bank = None

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.flag_defaults
        group.add_argument('--adv-ssat-guides', type=bounded_type('--adv-ssat-guides', int, 1),
                           default=d['adv_ssat_guides'], metavar='M',
                           help='ssat: guide samples of the nearest wrong class per image (default: %(default)s)')
        group.add_argument('--adv-ssat-guide-mode', choices=GUIDE_MODES, default=d['adv_ssat_guide_mode'],
                           help="ssat: guides nearest the image (class) or nearest the nearest wrong-class bank entry "
                                "(neighbours, the official notebook's guide=2) (default: %(default)s)")

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'SSATTask':
        check_label_free_args(args, 'ssat')
        if getattr(args, 'adv_targeted', None) not in (None, 'none'):
            raise ValueError('--adv-method ssat attacks toward guides of the nearest wrong class: drop --adv-targeted.')
        if not (getattr(args, 'pretrained_path', None) or getattr(args, 'initial_checkpoint', None)):
            _logger.warning('--adv-method ssat without a stage-1 checkpoint: the backbone starts from its initial '
                            'weights. Pass the contrastive run with --pretrained --pretrained-path '
                            '<stage1>/last.pth.tar.')
        guided: PGDAttack = cls.attack_from_args(args, mean, std)
        attack = KNNGuidedAttack(guided, num_guides=cls.setting(args, 'adv_ssat_guides'),
                                 guide_mode=cls.setting(args, 'adv_ssat_guide_mode'))
        return cls(model, bank_loader_from_args(args, model, device), args.num_classes, attack, mean=mean, std=std,
                   device=device, **cls.knn_kwargs(args, device))

    def on_epoch_start(self, epoch: int) -> None:
        """Re-embeds the bank the epoch's attacks are guided by (reused if the weights did not change)."""
        self._epoch_bank = self.feature_bank()

    def ideal_cost(self) -> Dict[str, float]:
        # the guided PGD, then one training step on clean + adversarial (2x batch); the clean reference
        # and the fooling check add two forwards on top
        return {'train_steps': 2.0, 'attack_passes': float(self.attack.steps)}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self._epoch_bank is None:  # used without the loop's on_epoch_start
            self._epoch_bank = self.feature_bank()
        bank = self._epoch_bank
        knn = self.knn_classifier(bank=bank)
        x = input.detach()
        with torch.no_grad(), attack_bn_mode(knn.backbone, 'eval'):  # the kNN judges as at test time
            reference = knn(x).argmax(dim=1)
        x_adv = self.attack(knn, x, reference, bank=bank)
        with torch.no_grad(), attack_bn_mode(knn.backbone, 'eval'):
            fooled = knn(x_adv).argmax(dim=1) != reference
        features = self.trainable_module(torch.cat([x, x_adv]))
        f_clean, f_adv = features.chunk(2)
        loss = info_nce(f_clean, f_adv, self.nce_temperature, weight=fooled.float())
        self.after_step()
        agreement = F.cosine_similarity(f_clean.detach().float(), f_adv.detach().float(), dim=1).mean()
        return {'loss': loss, 'output': f_adv, 'fooled': fooled.float().mean() * 100.0, 'agreement': agreement}

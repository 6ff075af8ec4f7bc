"""Stage 1 of self-supervised adversarial training: contrastive (InfoNCE) pre-training of a timm backbone.

Chen et al. (ICASSP 2020) start from a self-supervised AMDIM encoder, which timm does not have; we
pre-train any timm backbone with SimCLR-style InfoNCE instead. Per batch, two random views of every
image are drawn on the device (:class:`~timm_adv.data.ViewAugment`: random resized crop, flip,
brightness / contrast / saturation / hue jitter, random grayscale, optional blur and noise, in pixel
space; the colour defaults are SimCLR's CIFAR ones, no-ops on grey digits; ImageNet adds
``--adv-contrastive-blur 0.5``), both go through the backbone in one forward
(shared batch statistics) and a projection head, and the symmetric InfoNCE loss pulls each pair
together against the other ``2B - 2`` views of the batch. Labels are not used; the per-epoch
validation is the kNN of :class:`~timm_adv.tasks.representation.RepresentationTask`. The loader's own
augmentation is drawn once per image, before the task: with it on, both views are sub-crops of one
crop under one colour jitter, so the task warns and asks for ``--no-aug``.
"""
import argparse
import logging
from typing import Dict, Optional

import torch
import torch.nn as nn

from timm_adv.data import ViewAugment
from timm_adv.layers import PROJECTION_HEAD_KEY, insert_projection_head
from timm_adv.loss import info_nce, pair_top1
from .arg_types import bounded_type
from .registry import register_method
from .representation import (KNN_DEFAULTS, KNN_FLAGS, RepresentationTask, add_knn_args, bank_loader_from_args,
                             check_label_free_args)

__all__ = ['ContrastiveTask']

_logger = logging.getLogger(__name__)


@register_method('contrastive')
class ContrastiveTask(RepresentationTask):
    """InfoNCE on two augmented views, in-batch negatives, projection head (see the module docstring).

    Args:
        model: Feature model with a projection head (:func:`~timm_adv.layers.insert_projection_head`).
        bank_loader: Loader over the labelled bank split, for the kNN validation.
        num_classes: Classes of the bank labels.
        augment: The view augmentation.
        **kwargs: kNN / InfoNCE settings and normalisation of :class:`RepresentationTask`.

    Example:
        >>> model = insert_projection_head(timm.create_model('resnet10t'))
        >>> task = ContrastiveTask(model, bank_loader, 10, ViewAugment(hflip=0.0), mean=mean, std=std)
        >>> task(x, y)['loss'].backward()
    """

    paper = ('A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020), as '
             'stage 1 of self-supervised adversarial training')
    url = 'https://arxiv.org/abs/2002.05709'
    citation = ('@inproceedings{chen2020simple,\n  title = {A Simple Framework for Contrastive Learning of Visual '
                'Representations},\n  author = {Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, '
                'Geoffrey},\n  booktitle = {ICML},\n  year = {2020}\n}')

    uses_args = ()  # no training attack; the per-epoch robust validation takes --adv-val-eps / --adv-val-steps

    attack_defaults = dict(eps=0.03)  # only the per-epoch robust validation of the kNN attacks
    #: The kNN settings and the view augmentation (:class:`~timm_adv.data.ViewAugment`): no training attack.
    param_flags = {**KNN_FLAGS, 'scale': '--adv-contrastive-scale', 'hflip': '--adv-contrastive-hflip',
                   'jitter': '--adv-contrastive-jitter', 'noise_std': '--adv-contrastive-noise',
                   'saturation': '--adv-contrastive-saturation', 'hue': '--adv-contrastive-hue',
                   'grayscale': '--adv-contrastive-grayscale', 'blur': '--adv-contrastive-blur'}
    #: SimCLR's CIFAR views (no blur, no noise), a 512 -> 128 projection head, and the kNN defaults.
    flag_defaults = {**KNN_DEFAULTS, 'adv_contrastive_scale': (0.2, 1.0), 'adv_contrastive_hflip': 0.5,
                     'adv_contrastive_jitter': 0.4, 'adv_contrastive_saturation': 0.4, 'adv_contrastive_hue': 0.1,
                     'adv_contrastive_grayscale': 0.2, 'adv_contrastive_blur': 0.0, 'adv_contrastive_noise': 0.0,
                     'adv_contrastive_proj_dim': 128, 'adv_contrastive_proj_hidden': 512}

    def __init__(self, model: nn.Module, bank_loader, num_classes: int, augment: Optional[ViewAugment] = None,
                 **kwargs):
        super().__init__(model, bank_loader, num_classes, **kwargs)
        if not hasattr(model, PROJECTION_HEAD_KEY):
            raise ValueError('ContrastiveTask needs a projection head on the model: use insert_projection_head().')
        self.augment = augment or ViewAugment()
        if self.verbose:
            _logger.info(f'Contrastive pre-training: {self.augment}, InfoNCE T={self.nce_temperature}; labels are '
                         f'not used (the training criterion, e.g. --smoothing, neither).')

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        add_knn_args(group)
        d = cls.flag_defaults
        group.add_argument('--adv-contrastive-scale', type=float, nargs=2, default=d['adv_contrastive_scale'],
                           metavar=('MIN', 'MAX'),
                           help='contrastive: area range of the random resized crop of each view '
                                '(default: %(default)s)')
        group.add_argument('--adv-contrastive-hflip', type=float, default=d['adv_contrastive_hflip'], metavar='P',
                           help='contrastive: horizontal flip probability of each view; 0 for digits (default: '
                                '%(default)s)')
        group.add_argument('--adv-contrastive-jitter', type=float, default=d['adv_contrastive_jitter'], metavar='J',
                           help='contrastive: brightness / contrast jitter of each view (default: %(default)s)')
        group.add_argument('--adv-contrastive-saturation', type=float, default=d['adv_contrastive_saturation'],
                           metavar='S', help='contrastive: saturation jitter of each RGB view (default: %(default)s)')
        group.add_argument('--adv-contrastive-hue', type=float, default=d['adv_contrastive_hue'], metavar='H',
                           help='contrastive: hue jitter of each RGB view, in turns (default: %(default)s)')
        group.add_argument('--adv-contrastive-grayscale', type=float, default=d['adv_contrastive_grayscale'],
                           metavar='P', help='contrastive: probability of a grayscale RGB view (default: %(default)s)')
        group.add_argument('--adv-contrastive-blur', type=float, default=d['adv_contrastive_blur'], metavar='P',
                           help='contrastive: probability of a Gaussian blur of each view; 0.5 on ImageNet '
                                '(default: %(default)s)')
        group.add_argument('--adv-contrastive-noise', type=float, default=d['adv_contrastive_noise'], metavar='STD',
                           help='contrastive: Gaussian noise std added to each view, pixel units '
                                '(default: %(default)s)')
        group.add_argument('--adv-contrastive-proj-dim', type=bounded_type('--adv-contrastive-proj-dim', int, 1),
                           default=d['adv_contrastive_proj_dim'], metavar='D',
                           help='contrastive: projection head output size (default: %(default)s)')
        group.add_argument('--adv-contrastive-proj-hidden',
                           type=bounded_type('--adv-contrastive-proj-hidden', int, 1),
                           default=d['adv_contrastive_proj_hidden'], metavar='D',
                           help='contrastive: projection head hidden size (default: %(default)s)')

    @classmethod
    def prepare_model(cls, model: nn.Module, args: Optional[argparse.Namespace] = None) -> nn.Module:
        """Feature model (``num_classes=0``) plus the projection head (kept out of exports)."""
        return insert_projection_head(model, cls.setting(args, 'adv_contrastive_proj_hidden'),
                                      cls.setting(args, 'adv_contrastive_proj_dim'))

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'ContrastiveTask':
        check_label_free_args(args, 'contrastive')
        if not getattr(args, 'no_aug', True):
            _logger.warning('--adv-method contrastive with the loader\'s augmentation on: it is drawn once per image, '
                            'so both views are sub-crops of one crop under one colour jitter. Pass --no-aug; the '
                            'task draws the two views itself (--adv-contrastive-*).')
        augment = ViewAugment(scale=args.adv_contrastive_scale, hflip=args.adv_contrastive_hflip,
                              jitter=args.adv_contrastive_jitter, noise_std=args.adv_contrastive_noise,
                              saturation=args.adv_contrastive_saturation, hue=args.adv_contrastive_hue,
                              grayscale=args.adv_contrastive_grayscale, blur=args.adv_contrastive_blur)
        return cls(model, bank_loader_from_args(args, model, device), args.num_classes, augment=augment, mean=mean,
                   std=std, device=device, **cls.knn_kwargs(args, device))

    def ideal_cost(self) -> Dict[str, float]:
        return {'train_steps': 2.0, 'attack_passes': 0.0}  # one training step on the two views (2x batch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        x_pix = self.normalizer.to_pixel(input.detach())
        views = self.normalizer.from_pixel(torch.cat([self.augment(x_pix), self.augment(x_pix)]))
        features = self.trainable_module(views)
        z1, z2 = getattr(self.unwrapped_model, PROJECTION_HEAD_KEY)(features).chunk(2)
        loss = info_nce(z1, z2, self.nce_temperature)
        self.after_step()
        return {'loss': loss, 'output': features, 'pair_top1': pair_top1(z1, z2)}

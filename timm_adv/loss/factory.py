"""The training criterion of ``train.py``: timm's losses chosen by timm's train.py flags."""
import argparse

import torch.nn as nn
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ['create_train_criterion']


def create_train_criterion(args: argparse.Namespace, mixup_active: bool = False, num_aug_splits: int = 0) -> nn.Module:
    """The loss timm's train.py would train with for these flags.

    ``--jsd-loss`` (AugMix's Jensen-Shannon consistency over ``--aug-splits``) first; then, under
    mixup / cutmix, soft-target CE or ``--bce-loss``; then ``--bce-loss`` with ``--smoothing`` (also at
    0, where timm's script falls back to CE), label-smoothed CE, plain CE.
    The methods' attacks keep their own objective (CE on the logits, hard or soft labels): the
    threat model does not change with the training loss.

    Example:
        >>> criterion = create_train_criterion(args, mixup_active=args.mixup > 0)
    """
    bce_args = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:
        return JsdCrossEntropy(num_splits=num_aug_splits, smoothing=args.smoothing)
    if mixup_active:  # mixup's targets carry the smoothing
        return BinaryCrossEntropy(**bce_args) if args.bce_loss else SoftTargetCrossEntropy()
    if args.bce_loss:  # timm's train.py drops --bce-loss at --smoothing 0 (plain CE); here it still applies
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce_args)
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()

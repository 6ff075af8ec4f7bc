"""kNN evaluation of feature models: load the backbone, find or build its feature bank, wrap both, attack it.

``validate.py --knn`` turns any timm model (a self-supervised feature model, or a supervised
classifier whose head is dropped) into a :class:`~timm_adv.models.KNNClassifier`. A kNN's robust
accuracy is the per-sample worst case over two attacks (:func:`evaluate_knn_robustness`): PGD through
the soft vote, and :class:`~timm_adv.attacks.KNNGuidedAttack` on the representation. PGD alone can be
fooled: where all ``k`` neighbours share the true label the vote is exactly one-hot, its gradient is
zero and PGD never moves, while the guided attack needs no gradient of the vote.
"""
import os
from contextlib import nullcontext
from typing import Callable, Dict, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.models import create_model

from timm_adv.attacks import PGDAttack, create_knn_guided_attack
from timm_adv.models import BANK_FILE, FeatureBank, KNNClassifier, check_bank
from timm_adv.utils import check_state_dict_matches, checkpoint_state_dict, read_checkpoint
from .accuracy import evaluate_accuracy

__all__ = ['create_feature_model', 'find_model_bank', 'create_knn_classifier', 'knn_attacks',
           'evaluate_knn_robustness', 'evaluate_robust_accuracy']


def create_feature_model(model_name: str, pretrained: bool = False, checkpoint: str = '', use_ema: bool = False,
                         **kwargs) -> nn.Module:
    """A timm feature model (``num_classes=0``); a checkpoint's classifier weights, if any, are dropped.

    Works for self-supervised checkpoints (no head) and supervised ones (head ignored) alike.

    Example:
        >>> backbone = create_feature_model('resnet10t', checkpoint='output/train/stage1/last.pth.tar')
    """
    model = create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    if checkpoint:
        ckpt = read_checkpoint(checkpoint, '--checkpoint')
        state_dict = checkpoint_state_dict(ckpt, ema=use_ema)
        expected = model.state_dict()
        head = model.pretrained_cfg.get('classifier') or ''
        heads = tuple(f'{h}.' for h in ((head,) if isinstance(head, str) else head) if h)
        state_dict = {k: v for k, v in state_dict.items() if k in expected or not (heads and k.startswith(heads))}
        check_state_dict_matches(state_dict, model, '--checkpoint',
                                 arch=ckpt.get('arch', '') if isinstance(ckpt, dict) else '')
        model.load_state_dict(state_dict)
    return model


def find_model_bank(model_name: str) -> Optional[str]:
    """The ``knn_bank.safetensors`` published beside a ``local-dir:`` or ``hf-hub:`` model, if there is one."""
    if model_name.startswith('local-dir:'):
        path = os.path.join(model_name[len('local-dir:'):], BANK_FILE)
        return path if os.path.isfile(path) else None
    if model_name.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        repo_id = model_name[len('hf-hub:'):].split('@')[0]
        try:
            return hf_hub_download(repo_id, BANK_FILE)
        except Exception:  # not published, or offline without a cached copy
            return None
    return None


def create_knn_classifier(backbone: nn.Module, bank: FeatureBank, k: int = 75, temperature: float = 0.07,
                          backend: str = 'torch', device: Optional[torch.device] = None,
                          vote: str = 'weighted') -> KNNClassifier:
    """Wraps ``backbone`` and ``bank`` after checking that they fit (feature size, ``k`` <= bank size).

    Example:
        >>> knn = create_knn_classifier(backbone, load_feature_bank('hub/run/knn_bank.safetensors'), k=75)
    """
    check_bank(bank, k, num_features=backbone.num_features)
    return KNNClassifier(backbone, bank.to(device) if device is not None else bank, k, temperature, backend, vote)


def knn_attacks(pgd: PGDAttack, num_guides: int = 300, guide_mode: str = 'class') -> Dict[str, Callable]:
    """The attacks a kNN's robust accuracy is the worst case of: ``softvote`` (``pgd`` itself) and ``guided``
    (the kNN-guided attack with ``pgd``'s eps, steps, step size, norm, start and normalisation, one restart).

    Example:
        >>> attacks = knn_attacks(PGDAttack(0.1, steps=10, mean=mean, std=std))
    """
    guided = create_knn_guided_attack(eps=pgd.eps, steps=pgd.steps, step_size=pgd.step_size, norm=pgd.norm,
                                      random_start=pgd.random_start, num_guides=num_guides, mean=pgd.normalizer.mean,
                                      std=pgd.normalizer.std, guide_mode=guide_mode)
    return {'softvote': pgd, 'guided': guided}


def evaluate_knn_robustness(knn: KNNClassifier, loader, attacks: Mapping[str, Callable],
                            device: Optional[torch.device] = None, amp_autocast: Callable = nullcontext,
                            channels_last: bool = False) -> Dict[str, float]:
    """kNN top-1 (percent) under each attack and under the per-sample worst case over all of them.

    A sample counts as robust only if no attack changes its kNN prediction away from the true label.
    Counts are summed over processes under ``torch.distributed``.

    Returns:
        ``{'<name>_top1': ..., 'worst_top1': ..., 'samples': n}``.

    Example:
        >>> evaluate_knn_robustness(knn, loader, knn_attacks(pgd))
        {'softvote_top1': 91.0, 'guided_top1': 12.5, 'worst_top1': 12.0, 'samples': 200}
    """
    knn.eval()
    names = list(attacks)
    totals = torch.zeros(len(names) + 2, dtype=torch.float64)  # correct per attack, worst-case correct, count
    for input, target in loader:
        if device is not None:
            input, target = input.to(device), target.to(device)
        if channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        robust = torch.ones_like(target, dtype=torch.bool)
        for i, name in enumerate(names):
            with amp_autocast():
                x_adv = attacks[name](knn, input, target)
            knn.eval()
            with torch.no_grad(), amp_autocast():
                correct = knn(x_adv).argmax(dim=1) == target
            totals[i] += correct.sum().item()
            robust &= correct
        totals[-2] += robust.sum().item()
        totals[-1] += target.numel()
    if dist.is_available() and dist.is_initialized():
        reduced = totals.to(device if device is not None else 'cpu')
        dist.all_reduce(reduced)
        totals = reduced.cpu()
    n = max(float(totals[-1]), 1.0)
    result = {f'{name}_top1': float(100.0 * totals[i] / n) for i, name in enumerate(names)}
    result.update(worst_top1=float(100.0 * totals[-2] / n), samples=int(totals[-1]))
    return result


def evaluate_robust_accuracy(model: nn.Module, loader, attack: PGDAttack, device: Optional[torch.device] = None,
                             amp_autocast: Callable = nullcontext, channels_last: bool = False) -> Dict[str, float]:
    """The per-epoch robust figures: ``pgd_top1``, and for a kNN also each attack's own figure.

    For a :class:`~timm_adv.models.KNNClassifier`, ``pgd_top1`` is the per-sample worst case over
    :func:`knn_attacks` (``pgd_softvote_top1``, ``pgd_guided_top1`` beside it); for any other model it is
    top-1 under ``attack``.

    Example:
        >>> evaluate_robust_accuracy(task.get_eval_model(), loader_robust, val_attack)['pgd_top1']
    """
    if isinstance(model, KNNClassifier):
        knn = evaluate_knn_robustness(model, loader, knn_attacks(attack), device=device, amp_autocast=amp_autocast,
                                      channels_last=channels_last)
        return {'pgd_top1': knn['worst_top1'], 'pgd_softvote_top1': knn['softvote_top1'],
                'pgd_guided_top1': knn['guided_top1']}
    robust = evaluate_accuracy(model, loader, attack=attack, device=device, amp_autocast=amp_autocast,
                               channels_last=channels_last)
    return {'pgd_top1': robust['top1']}

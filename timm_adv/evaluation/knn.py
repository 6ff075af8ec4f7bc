"""kNN evaluation of feature models: load the backbone, find or build its feature bank, wrap both.

``validate.py --knn`` turns any timm model (a self-supervised feature model, or a supervised
classifier whose head is dropped) into a :class:`~timm_adv.models.KNNClassifier`; the usual clean and
PGD evaluation then measures kNN top-1 and PGD through the kNN's soft vote, and
:class:`~timm_adv.attacks.KNNGuidedAttack` adds the guided attack on the representation.
"""
import os
from typing import Optional

import torch
import torch.nn as nn
from timm.models import create_model

from timm_adv.models import BANK_FILE, FeatureBank, KNNClassifier, check_bank
from timm_adv.utils import check_state_dict_matches, checkpoint_state_dict, read_checkpoint

__all__ = ['create_feature_model', 'find_model_bank', 'create_knn_classifier']


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
                          backend: str = 'torch', device: Optional[torch.device] = None) -> KNNClassifier:
    """Wraps ``backbone`` and ``bank`` after checking that they fit (feature size, ``k`` <= bank size).

    Example:
        >>> knn = create_knn_classifier(backbone, load_feature_bank('hub/run/knn_bank.safetensors'), k=75)
    """
    check_bank(bank, k, num_features=backbone.num_features)
    return KNNClassifier(backbone, bank.to(device) if device is not None else bank, k, temperature, backend)

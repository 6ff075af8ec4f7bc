"""FGSM-RS (fast adversarial training): the task's defaults, flags and its training step."""
import argparse
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_fgsm_sdi import MEAN, STD, _batch, _model_inputs
from timm_adv.tasks import FGSMRSTask, get_method


def test_fgsm_rs_defaults_and_flags():
    args = argparse.Namespace(adv_eps=0.1, adv_steps=None, adv_step_size=None, adv_norm=None,
                              adv_random_start=None, adv_targeted=None, adv_bn_mode=None, adv_clean_weight=0.0)
    task = get_method('fgsm-rs').from_args(timm.create_model('test_resnet', num_classes=10), nn.CrossEntropyLoss(),
                                           args, mean=MEAN, std=STD)
    assert isinstance(task, FGSMRSTask)
    a = task.attack
    assert (a.steps, a.random_start, a.norm) == (1, True, 'linf')
    assert a.step_size == pytest.approx(0.125) and a.eps == pytest.approx(0.1)
    assert args.adv_step_size is None  # the caller's namespace is not modified
    with pytest.raises(ValueError, match='--adv-steps'):
        FGSMRSTask.attack_from_args(argparse.Namespace(**{**vars(args), 'adv_steps': 3}))
    x, y = _batch(8)
    task.train()
    seen, hook = _model_inputs(task)
    out = task(x, y)
    hook.remove()
    x_pix, x_adv = task.attack.normalizer.to_pixel(x), seen[-1]
    assert (x_adv - x_pix).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= -1e-6 and x_adv.max() <= 1 + 1e-6
    with torch.no_grad():
        clean_loss = F.cross_entropy(copy.deepcopy(task.unwrapped_model)(x), y)
    assert out['loss'] > clean_loss  # trained on a harder batch than the clean one
    assert torch.allclose(out['loss'], F.cross_entropy(out['output'], y))

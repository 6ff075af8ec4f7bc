"""AdvBN's attack: adversarial per-channel scaling of a feature map's statistics (Shu et al., NeurIPS 2021).

A feature map ``f`` (``[N, C, H, W]``) is split into its per-channel batch mean ``mu`` (over N, H, W)
and the centred part; two per-channel multipliers ``a`` (on the centred part) and ``b`` (on the
mean), shared by the whole batch, give ``f_adv = (f - mu) * a + mu * b`` (then ReLU when the
feature came out of one, as in the official ResNet code). The attack maximises the loss of the
network's remaining layers by signed-gradient ascent on ``a`` and ``b`` from 1, projected to
``[1 - eps, 1 + eps]``: the same ``ascent_step`` / ``project`` as the pixel attacks, applied to
``delta = a - 1``.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from timm_adv.utils.errors import ParameterError

from .bn_mode import attack_bn_mode, check_bn_mode
from .frozen import frozen_parameters
from .pgd import LossFn, _cross_entropy, ascent_step, attack_precision, project

__all__ = ['channel_mean', 'perturb_feature_stats', 'FeatureStatsAttack']


def channel_mean(feature: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over batch and space, shaped ``[1, C, 1, 1]``."""
    return feature.mean(dim=(0, 2, 3), keepdim=True)


def perturb_feature_stats(feature: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mean: Optional[torch.Tensor] = None,
                          relu: bool = False) -> torch.Tensor:
    """``(f - mu) * a + mu * b``, with ``mu`` the per-channel batch mean; ReLU after it with ``relu``.

    Example:
        >>> f = torch.rand(4, 8, 5, 5)
        >>> one = torch.ones(1, 8, 1, 1)
        >>> torch.allclose(perturb_feature_stats(f, one, one), f)   # a = b = 1 leaves the feature as it is
        True
    """
    mean = channel_mean(feature) if mean is None else mean
    out = (feature - mean) * a + mean * b
    return out.clamp_min(0.0) if relu else out


class FeatureStatsAttack:
    """AdvBN's attack on the feature statistics at a cut point, through the rest of the network.

    Args:
        eps: Multipliers stay in ``[1 - eps, 1 + eps]`` (paper: 1.1, i.e. ``[-0.1, 2.1]``).
        steps: Signed-gradient ascent steps (paper: 6).
        step_size: Step length (paper: 0.2).
        relu: Apply ReLU to the perturbed feature (the cut feature came out of a ReLU).
        bn_mode: BN behaviour of the network during the attack, one of ``BN_MODES`` (paper: ``eval``).
        loss_fn: Per-sample loss ``(logits, target) -> [B]``; cross-entropy (hard or soft targets) by default.
        autocast: Run under the surrounding (training) autocast instead of fp32 (see :func:`.attack_precision`).

    Example:
        >>> attack = FeatureStatsAttack(eps=1.1, steps=6, step_size=0.2, relu=True)
        >>> a, b = attack.perturb(model, lambda f: advbn.back(model, f), feature, target)
        >>> f_adv = perturb_feature_stats(feature, a, b, relu=attack.relu)
    """

    def __init__(self, eps: float = 1.1, steps: int = 6, step_size: float = 0.2, relu: bool = False,
                 bn_mode: str = 'eval', loss_fn: Optional[LossFn] = None, autocast: bool = False):
        if not eps > 0:
            raise ParameterError('eps', f'must be > 0, got {eps} (the paper uses 1.1).')
        if int(steps) != steps or steps < 1:
            raise ParameterError('steps', f'must be an integer >= 1, got {steps} (the paper uses 6).')
        if not step_size > 0:
            raise ParameterError('step_size', f'must be > 0, got {step_size} (the paper uses 0.2).')
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.relu = bool(relu)
        self.bn_mode = check_bn_mode(bn_mode)
        self.loss_fn = loss_fn or _cross_entropy
        self.autocast = bool(autocast)

    def perturb(
            self,
            model: nn.Module,
            back: Callable[[torch.Tensor], torch.Tensor],
            feature: torch.Tensor,
            target: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The adversarial multipliers ``(a, b)``, each ``[1, C, 1, 1]`` and detached.

        Args:
            model: The network ``back`` runs; it is put in ``bn_mode`` and restored after.
            back: Maps a cut feature to logits (only the layers after the cut).
            feature: The clean cut feature ``[N, C, H, W]`` (detached here: the attack moves a, b only).
            target: Labels or soft targets.
        """
        # a feature made under the training autocast is low precision: the fp32 attack lifts it
        feature = feature.detach() if self.autocast else feature.detach().float()
        mean = channel_mean(feature)
        delta_a = torch.zeros_like(mean)
        delta_b = torch.zeros_like(mean)
        with attack_bn_mode(model, self.bn_mode), frozen_parameters(model), torch.enable_grad(), \
                attack_precision(feature.device.type, self.autocast):
            for _ in range(self.steps):
                delta_a.requires_grad_(True)
                delta_b.requires_grad_(True)
                f_adv = perturb_feature_stats(feature, 1.0 + delta_a, 1.0 + delta_b, mean, self.relu)
                loss = self.loss_fn(back(f_adv), target).sum()
                grad_a, grad_b = torch.autograd.grad(loss, (delta_a, delta_b))
                delta_a = project(ascent_step(delta_a.detach(), grad_a, self.step_size), None, self.eps, clamp=False)
                delta_b = project(ascent_step(delta_b.detach(), grad_b, self.step_size), None, self.eps, clamp=False)
        return (1.0 + delta_a).detach(), (1.0 + delta_b).detach()

    def __repr__(self) -> str:
        return (f'FeatureStatsAttack(eps={self.eps:.5g}, steps={self.steps}, step_size={self.step_size:.5g}, '
                f'relu={self.relu}, bn_mode={self.bn_mode})')

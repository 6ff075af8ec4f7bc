"""kNN-guided PGD against a representation (Chen et al., ICASSP 2020, after Sitawarin & Wagner's DkNN attack).

A kNN classifier has no useful logits to differentiate, so the attack moves the representation
instead: for each image it picks ``m`` guide samples from the bank, all of the *nearest wrong
class*, and maximises ``logsumexp_j cos(f(x + delta), g_j)`` over the eps ball with PGD (random
start, L-inf by default). Moving next to many bank entries of one wrong class flips the vote.

Our resolution of the choices the source leaves open:

* nearest wrong class: the class of the most cosine-similar bank entry whose label differs from
  the reference class; the guides are the ``m`` entries of that class most similar to the clean
  feature (``m`` is capped by the smallest class in the bank);
* reference class: the true label when evaluating, the kNN's own clean prediction when training
  (stage 2 reads no labels);
* the objective is the plain log-sum-exp of cosines (no temperature).

The optimisation itself is :class:`~timm_adv.attacks.PGDAttack` with :func:`guided_similarity_loss`
as its per-sample loss and the guides as its target.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from timm_adv.models.knn import FeatureBank, KNNClassifier
from .bn_mode import attack_bn_mode
from .pgd import PGDAttack

__all__ = ['select_guides', 'guided_similarity_loss', 'KNNGuidedAttack', 'create_knn_guided_attack']


def select_guides(features: torch.Tensor, bank: FeatureBank, reference: torch.Tensor, m: int = 300) -> torch.Tensor:
    """Guide features ``[B, m', D]``: the ``m'`` bank entries of each sample's nearest wrong class.

    Args:
        features: L2-normalised clean features ``[B, D]``.
        bank: The kNN's feature bank.
        reference: The class each sample must leave ``[B]``.
        m: Guides per sample; ``m' = min(m, smallest class count in the bank)``.

    Example:
        >>> guides = select_guides(knn.embed(x), knn.bank, y, m=300)
    """
    counts = bank.class_counts()
    present = counts[counts > 0]
    if present.numel() < 2:
        raise ValueError('The guided attack needs a bank with at least two classes.')
    m = min(int(m), int(present.min()))
    labels = bank.labels.to(features.device)
    sims = features @ bank.features.to(features.device, features.dtype).t()
    wrong = sims.masked_fill(labels.unsqueeze(0) == reference.unsqueeze(1), float('-inf'))
    guide_class = labels[wrong.argmax(dim=1)]
    in_class = sims.masked_fill(labels.unsqueeze(0) != guide_class.unsqueeze(1), float('-inf'))
    idx = in_class.topk(m, dim=1).indices
    return bank.features.to(features.device, features.dtype)[idx]


def guided_similarity_loss(features: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
    """Per-sample ``logsumexp_j cos(features, guides_j)``; PGD maximises it."""
    cos = (F.normalize(features.float(), dim=1).unsqueeze(1) * guides.float()).sum(-1)
    return torch.logsumexp(cos, dim=1)


class KNNGuidedAttack:
    """PGD toward the guides of the nearest wrong class (see the module docstring).

    Args:
        attack: The PGD settings (eps, steps, step size, norm, random start, BN mode, normalisation); its
            loss is replaced by :func:`guided_similarity_loss`.
        num_guides: ``m``, guides per sample (300 in the paper).

    Example:
        >>> attack = create_knn_guided_attack(eps=0.03, steps=10, step_size=0.005, mean=mean, std=std)
        >>> x_adv = attack(knn, x, reference=y)
    """

    def __init__(self, attack: PGDAttack, num_guides: int = 300):
        if num_guides < 1:
            raise ValueError(f'--adv-ssat-guides / --knn-guides must be >= 1, got {num_guides}.')
        if attack.targeted is not None:
            raise ValueError('The kNN-guided attack already pushes toward guides: drop --adv-targeted.')
        attack.loss_fn = guided_similarity_loss
        self.attack = attack
        self.num_guides = int(num_guides)

    @property
    def steps(self) -> int:
        return self.attack.steps

    def __call__(self, knn: KNNClassifier, x: torch.Tensor, reference: torch.Tensor,
                 bank: Optional[FeatureBank] = None) -> torch.Tensor:
        """Adversarial ``x`` (same normalised space) that pushes each sample away from ``reference``."""
        bank = bank or knn.bank
        with torch.no_grad(), attack_bn_mode(knn.backbone, self.attack.bn_mode):
            guides = select_guides(knn.embed(x), bank, reference, self.num_guides)
        return self.attack(knn.backbone, x, guides)

    def __repr__(self) -> str:
        return f'KNNGuidedAttack(m={self.num_guides}, {self.attack!r})'


def create_knn_guided_attack(eps: float, steps: int = 10, step_size: Optional[float] = None, norm: str = 'linf',
                             random_start: bool = True, bn_mode: str = 'eval', num_guides: int = 300, mean=None,
                             std=None) -> KNNGuidedAttack:
    """A :class:`KNNGuidedAttack` from loose arguments (training: eps 0.03, 10 steps of 0.005 on STL-10)."""
    return KNNGuidedAttack(PGDAttack(eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=random_start,
                                     bn_mode=bn_mode, mean=mean, std=std), num_guides=num_guides)

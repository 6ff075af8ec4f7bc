"""InfoNCE with in-batch negatives (the NT-Xent form of SimCLR), optionally over a subset of anchors."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['info_nce', 'pair_top1']


def _pair_logits(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    # 2B x 2B cosine similarities / T, each view's similarity to itself masked out
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    logits = z @ z.t() / temperature
    return logits.fill_diagonal_(float('-inf'))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.2,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE between paired views ``a[i]`` and ``b[i]`` (``[B, D]`` each).

    Every view is an anchor; its positive is its pair, its negatives are the other ``2B - 2`` views of
    the batch. Minimising it maximises a lower bound on the mutual information between the two views.

    Args:
        a: First views' representations.
        b: Second views' representations (same order).
        temperature: Softmax temperature of the cosine similarities.
        weight: Optional per-pair weights ``[B]`` (e.g. a 0/1 mask of the pairs to learn from); the loss is
            their weighted mean, 0 (with a graph) when all weights are 0. Negatives always span the batch.

    Example:
        >>> loss = info_nce(head(backbone(view1)), head(backbone(view2)), temperature=0.2)
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f'info_nce needs two [B, D] tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}.')
    if not temperature > 0:
        raise ValueError(f'InfoNCE temperature must be > 0, got {temperature}.')
    n = a.shape[0]
    logits = _pair_logits(a, b, temperature)
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(a.device)
    per_view = F.cross_entropy(logits, positive, reduction='none')
    per_pair = (per_view[:n] + per_view[n:]) / 2
    if weight is None:
        return per_pair.mean()
    weight = weight.to(per_pair.dtype)
    return (per_pair * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def pair_top1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Percent of views whose most similar other view in the batch is their pair (instance discrimination)."""
    n = a.shape[0]
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(a.device)
    return (_pair_logits(a, b, 1.0).argmax(dim=1) == positive).float().mean() * 100.0

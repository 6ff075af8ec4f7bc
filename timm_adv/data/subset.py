"""A dataset subset that timm's ``create_loader`` can set a transform on."""
import torch
import torch.utils.data

__all__ = ['TransformSubset', 'spread_subset', 'random_subset']


class TransformSubset(torch.utils.data.Subset):
    """``torch.utils.data.Subset`` whose ``transform`` is the wrapped dataset's.

    timm's ``create_loader`` assigns ``dataset.transform``; on a plain ``Subset`` that attribute is
    ignored and raw PIL images reach the collate function.

    Example:
        >>> loader = create_loader(TransformSubset(dataset, range(500)), input_size=(3, 224, 224), batch_size=64)
    """

    @property
    def transform(self):
        return getattr(self.dataset, 'transform', None)

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def spread_subset(dataset, num_samples: int) -> TransformSubset:
    """A fixed subset of ``num_samples`` evenly spaced items (all of them if fewer).

    Evenly spaced rather than a prefix: folder datasets are sorted by class, so their first N
    images may hold a single class.

    Example:
        >>> robust_val = spread_subset(dataset_eval, 500)
    """
    total = len(dataset)
    n = min(num_samples, total)
    return TransformSubset(dataset, [i * total // n for i in range(n)])


def random_subset(dataset, num_samples: int, seed: int = 0) -> TransformSubset:
    """``num_samples`` items drawn uniformly without replacement by ``seed`` (all of them if fewer), in index order.

    A fresh draw is an evaluation sample nobody chose a recipe on, unlike a fixed spread or prefix.

    Example:
        >>> fresh = random_subset(dataset_eval, 300, seed=2026)
    """
    total = len(dataset)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(total, generator=generator)[:min(num_samples, total)]
    return TransformSubset(dataset, sorted(picked.tolist()))

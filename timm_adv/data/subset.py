"""A dataset subset that timm's ``create_loader`` can set a transform on."""
import torch.utils.data

__all__ = ['TransformSubset', 'spread_subset']


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

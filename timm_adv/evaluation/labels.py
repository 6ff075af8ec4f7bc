"""Scoring options of timm's validate.py: valid-label subsets, ImageNet ReaL labels, precision / recall / F1."""
import os
from typing import Dict, List

import torch
from timm.data import RealLabelsImagenet

from timm_adv.data import TransformSubset

__all__ = ['ClassMetrics', 'create_real_labels', 'dataset_filenames', 'read_valid_labels']


def read_valid_labels(path: str) -> List[int]:
    """Output indices of a partial label space, one integer a line (timm's ``--valid-labels`` file).

    Example:
        >>> model = LogitSubset(model, read_valid_labels('imagenet_a_indices.txt'))
    """
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    try:
        return [int(line) for line in lines]
    except ValueError:
        raise ValueError(f'--valid-labels {path!r}: every line must be an integer class index.') from None


def dataset_filenames(dataset) -> List[str]:
    """Image file basenames of a timm dataset, or of an index subset of one, in loader order.

    Example:
        >>> dataset_filenames(spread_subset(imagenet_val, 500))[:1]
        ['ILSVRC2012_val_00000001.JPEG']
    """
    if isinstance(dataset, TransformSubset):
        names = dataset_filenames(dataset.dataset)
        return [names[i] for i in dataset.indices]
    if not hasattr(dataset, 'filenames'):
        raise ValueError(f'--real-labels needs a dataset with image file names (an ImageNet validation folder); '
                         f'{type(dataset).__name__} has none.')
    return list(dataset.filenames(basename=True))


def create_real_labels(dataset, real_json: str) -> RealLabelsImagenet:
    """timm's ReaL-label scorer for ``dataset`` (the full ImageNet validation set or a subset of it).

    ``RealLabelsImagenet`` checks that its file list is the whole validation set; a subset (``--num-samples``,
    ``--attack-samples``) keeps that check on the full set and then scores only the subset's files.

    Example:
        >>> real = create_real_labels(dataset, 'real.json'); real.add_result(logits); real.get_accuracy(k=1)
    """
    base = dataset
    while isinstance(base, TransformSubset):
        base = base.dataset
    if not os.path.isfile(real_json):
        raise FileNotFoundError(f'--real-labels {real_json!r} does not exist; give the ReaL labels JSON '
                                f'(real.json of google-research/reassessed-imagenet).')
    try:
        real = RealLabelsImagenet(dataset_filenames(base), real_json=real_json)
    except AssertionError:
        raise ValueError(f'--real-labels {real_json!r} has one entry per ImageNet validation image; the dataset '
                         f'has {len(base)} images. Point --data-dir at the full ImageNet validation folder.') from None
    real.filenames = dataset_filenames(dataset)
    return real


class ClassMetrics:
    """Precision, recall and F1 (percent) over collected predictions, timm's ``--metrics-avg`` (scikit-learn).

    Example:
        >>> metrics = ClassMetrics('macro'); metrics.add_result(logits, target); metrics.compute()
        {'macro_precision': 71.2, 'macro_recall': 70.8, 'macro_f1_score': 70.6}
    """

    def __init__(self, average: str):
        self.average = average
        self.preds, self.targets = [], []

    def add_result(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(output.argmax(dim=1).cpu())
        self.targets.append(target.cpu())

    def compute(self) -> Dict[str, float]:
        from sklearn.metrics import f1_score, precision_score, recall_score
        preds, targets = torch.cat(self.preds).numpy(), torch.cat(self.targets).numpy()
        scores = dict(precision=precision_score, recall=recall_score, f1_score=f1_score)
        return {f'{self.average}_{name}': round(100 * float(fn(targets, preds, average=self.average, zero_division=0)),
                                                4) for name, fn in scores.items()}

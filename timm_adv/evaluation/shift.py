"""Distribution-shift test sets: ImageNet-A, ImageNet-R, ImageNet-Sketch, Stylized-ImageNet.

ImageNet-A and ImageNet-R cover 200 of the 1000 ImageNet classes; a 1000-class model is scored
on those 200 logits only (the arg-max over the subset), as in the datasets' official evaluation.
Sketch and Stylized-ImageNet use all 1000 classes.
"""
import logging
import os
from contextlib import nullcontext
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .accuracy import evaluate_folder

__all__ = ['IMAGENET_A_INDICES', 'IMAGENET_R_INDICES', 'SHIFT_TYPES', 'LogitSubset', 'evaluate_shift']

_logger = logging.getLogger(__name__)

#: ImageNet-1k indices of the 200 ImageNet-A classes, in the order of its sorted class folders.
IMAGENET_A_INDICES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301,
    306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363,
    372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461,
    462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572,
    573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704,
    719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815,
    820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932,
    933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988)

#: ImageNet-1k indices of the 200 ImageNet-R classes, in the order of its sorted class folders.
IMAGENET_R_INDICES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199,
    203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277,
    281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337,
    338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414,
    425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558,
    570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776,
    779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934,
    936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988)

#: Shift type -> ImageNet-1k logit subset (None: all 1000 classes).
SHIFT_TYPES: Dict[str, Optional[Sequence[int]]] = {
    'imagenet-a': IMAGENET_A_INDICES,
    'imagenet-r': IMAGENET_R_INDICES,
    'sketch': None,
    'stylized': None,
}


class LogitSubset(nn.Module):
    """Keeps the given output columns of a classifier, so ``argmax`` runs over a class subset.

    Example:
        >>> model_200 = LogitSubset(model, IMAGENET_A_INDICES)
    """

    def __init__(self, model: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer('indices', torch.tensor(list(indices), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)


def evaluate_shift(
        model: nn.Module,
        root: str,
        shift_type: str,
        data_config: Mapping,
        num_samples: Optional[int] = None,
        batch_size: int = 64,
        workers: int = 0,
        device: Optional[torch.device] = None,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
) -> Dict:
    """Top-1 / top-5 of an ImageNet model on a distribution-shift folder (``<class>/<image>``).

    Args:
        model: 1000-class ImageNet model taking normalised input.
        root: Dataset folder; its class folders are the WordNet ids, sorted.
        shift_type: ``imagenet-a``, ``imagenet-r``, ``sketch`` or ``stylized``.
        data_config: timm data config of the model.
        num_samples: Use only N evenly spaced images.
        batch_size: Batch size.
        workers: DataLoader workers.
        device: Device.
        amp_autocast: Autocast context factory.
        channels_last: Convert inputs to channels-last memory format.

    Example:
        >>> evaluate_shift(model, '/data/imagenet-a', 'imagenet-a', data_config)['top1']
    """
    if shift_type not in SHIFT_TYPES:
        raise ValueError(f'--shift-type must be one of {", ".join(SHIFT_TYPES)}, got {shift_type!r}.')
    if not os.path.isdir(root):
        raise FileNotFoundError(f'--shift-dir {root!r} is not a folder; point it at the extracted {shift_type} '
                                f'dataset (one sub-folder per class).')
    num_classes = getattr(model, 'num_classes', None)
    if num_classes != 1000:
        raise ValueError(f'{shift_type} is labelled with ImageNet-1k classes; the model has {num_classes} outputs. '
                         f'Evaluate a 1000-class ImageNet model.')
    indices = SHIFT_TYPES[shift_type]
    expected = len(indices) if indices is not None else 1000
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if len(classes) != expected:
        raise ValueError(f'--shift-dir {root!r} has {len(classes)} class folders; {shift_type} has {expected}. '
                         f'Point it at the complete, extracted dataset.')
    eval_model = LogitSubset(model, indices) if indices is not None else model
    if device is not None:
        eval_model = eval_model.to(device)
    result = evaluate_folder(eval_model, root, data_config, num_samples=num_samples, batch_size=batch_size,
                             workers=workers, device=device, log_prefix=shift_type, log_interval=50,
                             amp_autocast=amp_autocast, channels_last=channels_last)
    _logger.info(f'{shift_type}: top-1 {result["top1"]:.2f}% on {result["samples"]} images')
    return dict(type=shift_type, root=root, top1=result['top1'], top5=result['top5'], samples=result['samples'],
                classes=expected)

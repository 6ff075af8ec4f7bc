"""Published evaluation protocols as ``validate.py --protocol`` presets.

``robustbench-imagenet`` is RobustBench's ImageNet L-inf leaderboard protocol (also EasyRobust's
AutoAttack benchmark): AutoAttack ``standard`` at eps 4/255 on a fixed list of 5,000 ImageNet
validation images, so a model imported from a zoo can be re-measured and compared with its
published figure.

Example:
    >>> subset = image_list_subset(imagenet_val, read_image_list(robustbench_image_list()), '--aa-image-list')
"""
import os
from typing import Dict, List, Mapping, Sequence

from timm_adv.data import TransformSubset

from .labels import dataset_filenames

__all__ = ['PROTOCOLS', 'robustbench_image_list', 'read_image_list', 'image_list_subset']

#: Preset name -> the validate.py settings it fixes (``dest: value``) and its description.
PROTOCOLS: Dict[str, Mapping] = {
    'robustbench-imagenet': dict(
        settings=dict(autoattack='standard', aa_eps='4/255', aa_norm='linf', aa_samples=5000),
        description="RobustBench ImageNet L-inf: AutoAttack standard, eps 4/255, RobustBench's 5,000 validation "
                    'images'),
}


def robustbench_image_list() -> str:
    """Path of RobustBench's list of its 5,000 ImageNet validation images (from the installed robustbench).

    Raises:
        FileNotFoundError: robustbench is not installed; the message names the fix.
    """
    import importlib.util
    spec = importlib.util.find_spec('robustbench')
    path = os.path.join(spec.submodule_search_locations[0], 'helper_files', 'imagenet_test_image_ids.txt') \
        if spec and spec.submodule_search_locations else ''
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "--protocol robustbench-imagenet needs RobustBench's list of its 5,000 ImageNet images: install "
            'robustbench (pip install --no-deps robustbench==1.1.1) or pass --aa-image-list FILE (its '
            'helper_files/imagenet_test_image_ids.txt).')
    return path


def read_image_list(path: str) -> List[str]:
    """Image file names, one per line (``<wnid>/<file>.JPEG`` or bare file names), in file order."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def image_list_subset(dataset, names: Sequence[str], flag: str = '--aa-image-list') -> TransformSubset:
    """The images of ``dataset`` named in ``names`` (matched by file basename), in the list's order.

    Raises:
        ValueError: The dataset has no file names, or lacks some listed images (the count and an example).
    """
    try:
        files = dataset_filenames(dataset)
    except ValueError:
        raise ValueError(f'{flag} needs a dataset with image file names (an ImageNet validation folder, '
                         f'--data-dir /data/imagenet --split val); {type(dataset).__name__} has none.') from None
    index = {name: i for i, name in enumerate(files)}
    wanted = [os.path.basename(n) for n in names]
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(f'{flag}: {len(missing)} of the {len(wanted)} listed images are not in the dataset (e.g. '
                         f'{missing[0]}); point --data-dir/--split at the full ImageNet validation set.')
    return TransformSubset(dataset, [index[n] for n in wanted])

"""Training recipes that datasets carry, applied only to the flags a user did not give.

timm's train.py defaults are an ImageNet recipe (RandomResizedCrop down to 8% of the image,
flips, colour jitter, 5 warm-up epochs, 300 epochs). On the bundled 32 px digits they train slowly
and badly, so a bundled dataset brings its own recipe. "Not given" means not typed on the command
line and not set by a ``-c`` config: :func:`timm_adv.utils.explicit_args` asks argparse which
destinations the arguments touched (a value equal to timm's default still counts as given).

A recipe knows when a run fine-tunes (:func:`is_fine_tuning`: a method that always starts from a trained
model, or any run given a starting checkpoint): from-scratch settings (a large learning rate, many
epochs) would undo what the checkpoint learned, so those items give way to fine-tuning ones.

Example:
    >>> args = parser.parse_args(argv)
    >>> applied = apply_dataset_recipe(args, explicit_args(parser, argv))
    >>> print(format_recipe('bundled/mnist', applied, fine_tuning=is_fine_tuning(args)))
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, Optional, Set, Tuple

from .dataset_factory import DEFAULT_DATASET

__all__ = ['DatasetRecipe', 'RecipeItem', 'DATASET_RECIPES', 'FINE_TUNING_METHODS', 'get_dataset_recipe',
           'resolve_dataset_name', 'is_fine_tuning', 'apply_bundled_defaults', 'apply_dataset_recipe', 'format_recipe',
           'available_cpus', 'default_workers']

#: Methods that always fine-tune a trained model (AdvBN; SSAT stage 2 starts from stage 1).
FINE_TUNING_METHODS = ('advbn', 'ssat')
#: Flags that give a run its starting weights.
_START_WEIGHTS = ('initial_checkpoint', 'pretrained', 'pretrained_path')


def is_fine_tuning(args: argparse.Namespace) -> bool:
    """Whether the run fine-tunes: a method that always does, or starting weights given (AdvProp or PGD-AT from a
    checkpoint, an MAE encoder, a hub model)."""
    return getattr(args, 'adv_method', 'none') in FINE_TUNING_METHODS or any(
        getattr(args, k, None) for k in _START_WEIGHTS)


@dataclass(frozen=True)
class RecipeItem:
    """Values set together, only if none of their own flags nor the related ones were given.

    Args:
        values: ``{dest: value}`` in argparse destination names (``batch_size``, ``adv_steps``); a
            callable value is computed from the parsed arguments (``None`` leaves the flag alone).
        unless_given: Further destinations that, when given, leave this item out (``--opt`` keeps
            the recipe's SGD learning rate away from another optimiser).
        if_given: Apply only when at least one of these destinations was given.
        methods: Apply only with these ``--adv-method`` values (all when empty).
        except_methods: Never with these ``--adv-method`` values.
        fine_tune: Apply only when fine-tuning (True), only when training from scratch (False), or both (None).
    """
    values: Dict[str, Any]
    unless_given: FrozenSet[str] = frozenset()
    if_given: FrozenSet[str] = frozenset()
    methods: Tuple[str, ...] = ()
    except_methods: Tuple[str, ...] = ()
    fine_tune: Optional[bool] = None

    def applies(self, explicit: Set[str], method: str, fine_tuning: bool = False) -> bool:
        if self.methods and method not in self.methods or method in self.except_methods:
            return False
        if self.fine_tune is not None and self.fine_tune != fine_tuning:
            return False
        if self.if_given and not self.if_given & explicit:
            return False
        return not (set(self.values) | self.unless_given) & explicit


@dataclass(frozen=True)
class DatasetRecipe:
    """What a dataset brings: its input config (train and validate) and a training recipe (train).

    Args:
        data_config: Input size, crop, interpolation and class count, for flags left at ``None``.
        train: Training flags, applied by :func:`apply_dataset_recipe` to flags not given.
    """
    data_config: Dict[str, Any]
    train: Tuple[RecipeItem, ...] = field(default_factory=tuple)


# a learning-rate item is not forced on another optimiser or on a --lr-base rule
_LR_RULES = frozenset({'lr_base', 'lr_base_size', 'lr_base_scale', 'opt'})

# flags that ask for training augmentation (each makes the recipe drop --no-aug)
_AUGMENTATION = frozenset({'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'aa', 'reprob', 'remode', 'recount',
                           'train_crop_mode', 'train_interpolation'})

DATASET_RECIPES: Dict[str, DatasetRecipe] = {
    'bundled/mnist': DatasetRecipe(
        # the digits are 28 px, upsampled to 32 for timm's strided stems
        data_config=dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation='bilinear', num_classes=10),
        train=(
            # no augmentation (the demo's recipe); give any augmentation flag and the others keep
            # digits digits: no flips (a mirrored 2 is no digit), no colour jitter, the whole digit in view
            RecipeItem(dict(no_aug=True), unless_given=_AUGMENTATION),
            RecipeItem(dict(scale=[1.0, 1.0]), if_given=_AUGMENTATION),
            RecipeItem(dict(ratio=[1.0, 1.0]), if_given=_AUGMENTATION),
            RecipeItem(dict(hflip=0.0), if_given=_AUGMENTATION),
            RecipeItem(dict(color_jitter=0.0), if_given=_AUGMENTATION),
            RecipeItem(dict(train_interpolation='bilinear'), if_given=_AUGMENTATION),
            RecipeItem(dict(epochs=10), fine_tune=False),
            RecipeItem(dict(warmup_epochs=0)),
            RecipeItem(dict(batch_size=64)),
            RecipeItem(dict(lr=0.05), unless_given=_LR_RULES, fine_tune=False),
            RecipeItem(dict(weight_decay=5e-4), fine_tune=False),
            # fine-tuning (AdvBN, SSAT stage 2, anything from a checkpoint): lr 0.05 for one epoch takes a
            # 97.4% plain resnet10t to 90.2% under AdvBN; SGD 0.01, wd 1e-4 for 2 epochs keeps it (97.5%)
            RecipeItem(dict(epochs=2), fine_tune=True),
            RecipeItem(dict(lr=0.01), unless_given=_LR_RULES, except_methods=('ssat',), fine_tune=True),
            RecipeItem(dict(weight_decay=1e-4), except_methods=('ssat',), fine_tune=True),
            # SSAT stage 2: the official notebook's optimiser, Adam lr 1e-4, betas (0.8, 0.999), wd 1e-5
            RecipeItem(dict(opt='adam', lr=1e-4, opt_betas=[0.8, 0.999]),
                       unless_given=frozenset({'lr_base', 'lr_base_size', 'lr_base_scale'}), methods=('ssat',)),
            RecipeItem(dict(weight_decay=1e-5), methods=('ssat',)),
            # 4,000 small images held in memory: loader processes cost more than they save
            RecipeItem(dict(workers=0)),
            RecipeItem(dict(adv_val_samples=200)),
            # no label smoothing: smoothed targets flatten the loss surface that gradient attacks climb,
            # so PGD-AT trained with them looks more robust to PGD than it is (Fu et al., "Label
            # smoothing and adversarial robustness", arXiv:2009.08233, 2020)
            RecipeItem(dict(smoothing=0.0)),
            # PGD-AT as the demo trains it: 5 steps of eps / 4 (0.025 at eps 0.1), 6 passes a batch;
            # 10 epochs x 6 passes hold up under AutoAttack where 8 x 8 did not (README, demo)
            RecipeItem(dict(adv_steps=5, adv_step_size=lambda args: args.adv_eps / 4 if args.adv_eps else None),
                       methods=('pgd',)),
        ),
    ),
}


def get_dataset_recipe(name: Optional[str]) -> Optional[DatasetRecipe]:
    """The recipe a dataset carries, or ``None`` (timm's own defaults apply)."""
    return DATASET_RECIPES.get((name or '').lower())


def apply_bundled_defaults(args: argparse.Namespace) -> None:
    """Fills unset input-size, crop, interpolation and class-count flags from the dataset's recipe.

    These flags default to ``None``, so ``None`` is "not given"; flags the user gave always win.
    Works on train.py and validate.py namespaces.

    Example:
        >>> args.dataset = 'bundled/mnist'
        >>> apply_bundled_defaults(args)   # args.input_size == [3, 32, 32], args.num_classes == 10
    """
    recipe = get_dataset_recipe(getattr(args, 'dataset', None))
    if recipe is None:
        return
    cfg = recipe.data_config
    if args.input_size is None and args.img_size is None:
        args.input_size = list(cfg['input_size'])
    if args.crop_pct is None:
        args.crop_pct = cfg['crop_pct']
    if not args.interpolation:
        args.interpolation = cfg['interpolation']
    if args.num_classes is None:
        args.num_classes = cfg['num_classes']


def resolve_dataset_name(args: argparse.Namespace) -> str:
    """The dataset train.py / validate.py will use: ``--dataset``, or the bundled default without data."""
    if getattr(args, 'dataset', None):
        return args.dataset
    return '' if (getattr(args, 'data_dir', None) or getattr(args, 'data', None)) else DEFAULT_DATASET


def apply_dataset_recipe(args: argparse.Namespace, explicit: Iterable[str]) -> Optional[Dict[str, Any]]:
    """Fills the flags not given with the dataset's recipe; returns what it set, or ``None`` without a recipe.

    Args:
        args: Parsed train.py arguments.
        explicit: Destinations the user gave (:func:`timm_adv.utils.explicit_args` plus the keys of a ``-c`` config).

    Example:
        >>> applied = apply_dataset_recipe(args, explicit_args(parser, argv))
    """
    recipe = get_dataset_recipe(resolve_dataset_name(args))
    if recipe is None:
        return None
    explicit = set(explicit)
    fine_tuning = is_fine_tuning(args)
    applied = {}
    for item in recipe.train:
        if item.applies(explicit, getattr(args, 'adv_method', 'none'), fine_tuning):
            for dest, value in item.values.items():
                value = value(args) if callable(value) else value
                if value is not None:
                    setattr(args, dest, list(value) if isinstance(value, list) else value)
                    applied[dest] = value
    return applied


def format_recipe(name: str, applied: Dict[str, Any], fine_tuning: bool = False) -> str:
    """One start-up line listing the recipe's flags as the user would type them (and saying it fine-tunes)."""
    def text(value):
        return f'{value:g}' if isinstance(value, float) else str(value)

    def flag(dest, value):
        option = f'--{dest.replace("_", "-")}'
        if value is True:
            return option
        return f'{option} {" ".join(map(text, value)) if isinstance(value, (list, tuple)) else text(value)}'

    what = f'{name} (fine-tuning)' if fine_tuning else name
    if not applied:
        return f'recipe for {what}: nothing applied, every recipe flag was given'
    return f'recipe for {what}: {", ".join(flag(d, v) for d, v in applied.items())} (flags you give win)'


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(preferred: int) -> int:
    """A ``--workers`` default never above the CPUs of this process (shared between torchrun's local processes)."""
    local_procs = max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    return max(0, min(preferred, available_cpus() // local_procs))

from .bundled import BUNDLED_DATASETS, BundledMnist, apply_bundled_defaults, is_bundled
from .dataset_factory import DEFAULT_DATASET, create_dataset
from .subset import TransformSubset, spread_subset
from .batch_augment import ViewAugment
from .bank_loader import create_bank_loader

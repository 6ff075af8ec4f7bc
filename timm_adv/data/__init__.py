from .bundled import BUNDLED_DATASETS, BundledMnist, is_bundled
from .dataset_factory import DEFAULT_DATASET, create_dataset
from .recipes import (DATASET_RECIPES, FINE_TUNING_METHODS, DatasetRecipe, RecipeItem, apply_bundled_defaults,
                      apply_dataset_recipe, available_cpus, default_workers, format_recipe, get_dataset_recipe,
                      is_fine_tuning, resolve_dataset_name)
from .subset import TransformSubset, random_subset, spread_subset
from .batch_augment import ViewAugment
from .bank_loader import create_bank_loader
from .loaders import TrainLoaders, create_train_loaders, is_iterable_dataset, set_loader_epoch
from .unreadable import UnreadableImageError, check_unreadable_images, unreadable_image_message

from .bundled import BUNDLED_DATASETS, BundledMnist, bundled_data_config, is_bundled
from .dataset_factory import DEFAULT_DATASET, create_dataset

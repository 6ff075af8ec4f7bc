from .factory import create_train_criterion
from .info_nce import info_nce, pair_top1

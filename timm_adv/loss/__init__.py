from .info_nce import info_nce, pair_top1

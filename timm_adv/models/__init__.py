from .mae import (
    MAE_HEAD_INIT_STD, MAELoadReport, MAEWeights, is_mae_checkpoint, is_mae_tag, load_mae_weights,
    mae_checkpoint_filter_fn, resolve_mae_weights, warn_mae_normalisation,
)
from .sdi_generator import PreActResBlock, SDIGenerator, create_sdi_generator
from .knn import (
    BANK_DTYPES, BANK_FILE, DEFAULT_CHUNK, KNN_BACKENDS, KNN_VOTES, FeatureBank, KNNClassifier, bank_bytes,
    build_feature_bank, check_bank, check_knn_settings, import_faiss, input_keys, knn_search, load_feature_bank,
    save_feature_bank,
)

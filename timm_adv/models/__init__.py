from .sdi_generator import PreActResBlock, SDIGenerator, create_sdi_generator
from .knn import (
    BANK_FILE, KNN_BACKENDS, FeatureBank, KNNClassifier, build_feature_bank, check_bank, check_knn_settings,
    import_faiss, knn_search, load_feature_bank, save_feature_bank,
)

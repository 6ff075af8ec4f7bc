from .bn_mode import BN_MODES, attack_bn_mode, check_bn_mode
from .factory import create_attack, parse_eps
from .frozen import frozen_parameters
from .feature_stats import FeatureStatsAttack, channel_mean, perturb_feature_stats
from .normalize import PixelNormalizer
from .pgd import (
    NORMS, TARGETINGS, PGDAttack, ascent_step, attack_precision, hard_labels, input_gradient, per_sample_norm, project,
    random_init, select_target, unwrap_ddp,
)
from .knn_guided import GUIDE_MODES, KNNGuidedAttack, create_knn_guided_attack, guided_similarity_loss, select_guides

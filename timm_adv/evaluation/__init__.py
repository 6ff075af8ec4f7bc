from .accuracy import evaluate_accuracy, evaluate_folder
from .autoattack import PixelSpaceModel, collect_samples, evaluate_autoattack
from .corruptions import (ALEXNET_ERRORS, IMAGENET_C_CORRUPTIONS, SEVERITIES, CorruptedDataset, CorruptionFolderError,
                          compute_mce, evaluate_corruption_folder, evaluate_generated_corruptions,
                          scan_corruption_folder)
from .report import report_to_markdown, save_plots, save_report
from .shift import IMAGENET_A_INDICES, IMAGENET_R_INDICES, SHIFT_TYPES, LogitSubset, evaluate_shift
from .overfit_guard import (
    CO_ACTIONS, GuardRecord, OverfitGuard, add_overfit_guard_args, check_overfit_guard_args, create_overfit_guard,
    detect_collapse, guard_enabled,
)
from .knn import (create_feature_model, create_knn_classifier, evaluate_knn_robustness, evaluate_robust_accuracy,
                  find_model_bank, knn_attacks)
from .bulk import list_bulk_models, run_with_retry, write_results
from .labels import ClassMetrics, create_real_labels, dataset_filenames, read_valid_labels
from .model_wrap import DtypeModel, wrap_eval_model
from .protocols import PROTOCOLS, image_list_subset, read_image_list, robustbench_image_list
from .validation_record import read_validation, validation_protocol, validation_rows

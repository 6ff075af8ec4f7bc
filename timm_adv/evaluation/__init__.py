from .accuracy import evaluate_accuracy
from .overfit_guard import (
    CO_ACTIONS, GuardRecord, OverfitGuard, add_overfit_guard_args, create_overfit_guard, detect_collapse,
)

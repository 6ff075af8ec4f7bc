from .checkpoint import (
    CheckpointError, check_state_dict_matches, checkpoint_state_dict, load_training_checkpoint, read_checkpoint,
    state_dict_mismatch,
)
from .files import file_sha256

from .checkpoint import (
    CheckpointError, check_state_dict_matches, checkpoint_state_dict, load_training_checkpoint, read_checkpoint,
)
from .args import explicit_args, flag_name

from .checkpoint import (
    CheckpointError, check_state_dict_matches, checkpoint_state_dict, load_training_checkpoint, read_checkpoint,
)
from .optim import check_layer_decay

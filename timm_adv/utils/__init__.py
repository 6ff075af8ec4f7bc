from .checkpoint import CheckpointError, check_state_dict_matches, checkpoint_state_dict, read_checkpoint

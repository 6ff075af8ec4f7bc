from .checkpoint import (
    CheckpointError, check_state_dict_matches, checkpoint_state_dict, load_training_checkpoint, read_checkpoint,
    state_dict_mismatch,
)
from .args import bounded_type, explicit_args, flag_name
from .errors import ParameterError, flag_errors
from .files import atomic_write, check_writable, file_sha256
from .optim import check_layer_decay, sync_lookahead
from .rng import ReplayCheckpointSaver, gather_rng_states, get_rng_state, set_rng_state
from .compile import check_compile_args, compiled_graphs
from .elastic import agree_on_attempt, elastic_init_method, init_distributed_device
from .timm_args import MODEL_DTYPES, RUNTIME_CONFIG_KEYS, check_timm_args, split_config_keys
from .wandb_log import WandbLogger, create_wandb_logger, import_wandb
from .preemption import (
    PREEMPT_SIGNALS, CheckpointWriteError, Preempted, PreemptionHandler, RecoverySaver, checkpoint_position,
    ResumableBatches, find_resume_checkpoint, resolve_auto_resume, save_recovery, start_epoch_rng,
)
from .scrub import REDACTED, find_leaks, scrub, scrub_text
from .progress import DEFAULT_INTERVAL_S, ProgressLog, format_duration

from .base import ATTACK_ARGS, AdversarialTask, top1
from .registry import get_method, list_methods, register_method
from .standard import PGDTrainingTask, StandardTask
from .advprop import AdvPropTask
from .advbn import AdvBNTask
from .fgsm_rs import FGSMRSTask
from .fgsm_sdi import FGSMSDITask
from .dat import DATTask
from .distill import DistillationMixin, distilled_method
from .factory import add_adv_args, check_adv_args, create_task, method_arg_dests, method_args
from .representation import RepresentationTask
from .contrastive import ContrastiveTask
from .ssat import SSATTask

"""timm-adv: adversarial training methods for timm models."""
from .version import __version__

from .attacks import PGDAttack, PixelNormalizer, attack_bn_mode, create_attack, parse_eps
from .tasks import AdversarialTask, add_adv_args, create_task, get_method, list_methods, register_method

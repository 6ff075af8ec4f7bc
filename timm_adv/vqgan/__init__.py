"""VQGAN discretiser on taming-transformers: load published checkpoints, fit one to small images.

    >>> from timm_adv.vqgan import create_vqgan
    >>> vq = create_vqgan('vqgan_mnist')  # the folder `python -m timm_adv.vqgan fit --out vqgan_mnist` wrote
    >>> x_rec = vq.reconstruct(images)    # images in [0, 1] -> codebook-snapped images
"""
from .config import VQGAN_PRESETS, VQGANConfig, list_vqgan_presets, load_vqgan_config
from .discretizer import VQGANDiscretizer, compare_precision
from .factory import (
    CONFIG_FILE, WEIGHTS_FILE, create_vqgan, load_vqgan_weights, preset_folder, save_vqgan, vqgan_home,
)
from .memory import chunk_for_budget, default_memory_budget, peak_memory_bytes, vqgan_activation_bytes
from .model import VQModel

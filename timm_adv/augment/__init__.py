from .discrete_adversarial import (
    DiscreteAdversarialAugment, DiscreteAdversarialBatch, check_vqgan_input_size, compile_vqgan,
)
from .preview import PREVIEW_ROWS, dat_preview_grid, save_dat_preview

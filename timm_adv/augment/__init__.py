from .discrete_adversarial import (
    DiscreteAdversarialAugment, DiscreteAdversarialBatch, check_vqgan_input_size, compile_vqgan,
)

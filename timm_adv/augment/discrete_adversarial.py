"""Discrete adversarial augmentation, the batch transform of DAT (Mao et al., NeurIPS 2022).

Per batch, as the official code (EasyRobust ``examples/imageclassification/imagenet/dat``) does it:

1. ``x_rec = reconstruct(x)``: the VQGAN's encode -> nearest codebook entries -> decode, no gradient;
2. an attack from :mod:`timm_adv.attacks` at ``x_rec`` (official: one L2 step of 0.1 within eps 0.1,
   a random start on the eps sphere with probability 0.8 per batch, per-sample normalised gradient,
   projection, clamp to [0, 1], model in train mode, soft targets under mixup / cutmix);
3. ``x_dat = reconstruct(x_rec + delta)``, no gradient.

The VQGAN is never differentiated: the attack gradient is taken at ``x_rec`` and applied before the
second reconstruction (an implicit straight-through estimator). The attack computes input gradients
only, so parameter ``.grad`` is untouched and no DDP all-reduce fires.

Two things are cheaper than in the official code without changing the result: the first
reconstruction keeps its codes, and a sample whose adversarial image encodes to the same codes is
not decoded again (its ``x_dat`` is ``x_rec``, exactly what decoding would give); and the VQGAN
runs outside the training autocast, at the precision it was built with.

Inputs are clamped to [0, 1] before the VQGAN: timm's random erasing writes N(0, 1) noise, outside
the range the VQGAN was trained on.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from timm_adv.attacks import PGDAttack

__all__ = ['DiscreteAdversarialAugment', 'DiscreteAdversarialBatch', 'check_vqgan_input_size', 'compile_vqgan']


class DiscreteAdversarialBatch(NamedTuple):
    """What :meth:`DiscreteAdversarialAugment.generate` returns.

    Attributes:
        images: The discrete adversarial images ``x_dat``, in the model's input space.
        code_change: Fraction of code positions where ``x_dat``'s codes differ from the clean image's
            (``[]`` tensor); the reconstruction alone moves some, since a VQGAN is not idempotent.
        samples_changed: Fraction of samples with at least one such code, i.e. decoded twice (``[]`` tensor).
        attacked: The attack's result ``x_rec + delta`` in pixels, before the second reconstruction.
    """
    images: torch.Tensor
    code_change: torch.Tensor
    samples_changed: torch.Tensor
    attacked: torch.Tensor


def check_vqgan_input_size(vqgan: nn.Module, input_size, flag: str = '--adv-dat-vqgan') -> None:
    """Fails, naming the flags, when the VQGAN's downsampling factor does not divide the image size.

    Example:
        >>> check_vqgan_input_size(vqgan, (3, 224, 224))  # f = 8: 28 x 28 codes
    """
    factor = int(vqgan.downsample_factor)
    height, width = input_size[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f'{flag}: the VQGAN downsamples by {factor}, which does not divide the input size {height}x{width} '
            f'(--img-size / --input-size); use a multiple of {factor} or a VQGAN with a smaller factor.')


def compile_vqgan(vqgan: nn.Module, **compile_kwargs) -> nn.Module:
    """Compiles the encoder and decoder of a :class:`~timm_adv.vqgan.VQGANDiscretizer` in place, once.

    GroupNorm + SiLU at full resolution are memory-bound and fuse well (1.3x to 2.7x per pass on a
    2-core CPU in ``benchmarks/dat_cost.py`` runs), at the price of minutes of compilation. DAT decodes
    only the samples whose codes changed, a different count each step: the VQGAN is switched to
    ``static_batch`` (every pass padded to its chunk size) so that one graph serves every step. Call it
    after loading the weights: compiled submodules prefix their ``state_dict`` keys.

    Args:
        vqgan: The discretiser.
        **compile_kwargs: Passed to ``torch.compile`` (e.g. ``backend``); shapes are static.

    Example:
        >>> vqgan = compile_vqgan(create_vqgan('vq-f8', checkpoint_path='model.ckpt'))
    """
    compile_kwargs.setdefault('dynamic', False)
    vqgan.model.encoder = torch.compile(vqgan.model.encoder, **compile_kwargs)
    vqgan.model.decoder = torch.compile(vqgan.model.decoder, **compile_kwargs)
    vqgan.static_batch = True
    return vqgan


class DiscreteAdversarialAugment:
    """DAT's augmentation: ``(model, images, targets) -> discrete adversarial images``.

    Usable from any training loop; the model is attacked through ``attack`` (its BN mode, eps, steps,
    random start and input normalisation), the images pass through ``vqgan`` twice.

    Args:
        vqgan: A frozen VQGAN discretiser (:class:`timm_adv.vqgan.VQGANDiscretizer`): ``encode(x)`` ->
            code indices, ``decode(indices)`` -> images in [0, 1], ``downsample_factor``.
        attack: The attack run at the reconstruction, in pixel space; its ``normalizer`` maps between
            the loader's normalised space and pixels.

    Example:
        >>> attack = create_attack(0.1, steps=1, step_size=0.1, norm='l2', bn_mode='train', start_prob=0.8,
        ...                        start_on_sphere=True, mean=mean, std=std)
        >>> augment = DiscreteAdversarialAugment(create_vqgan('vq-f8'), attack)
        >>> x_dat = augment(model, x, target)   # same space and shape as x
        >>> loss = criterion(model(x), target) + criterion(model(x_dat), target)
    """

    def __init__(self, vqgan: nn.Module, attack: PGDAttack):
        self.vqgan = vqgan
        self.attack = attack

    @property
    def normalizer(self):
        return self.attack.normalizer

    def _vqgan_context(self, x: torch.Tensor):
        # the VQGAN keeps the precision it was built with, whatever autocast the training step runs in
        return torch.autocast(device_type=x.device.type, enabled=False)

    @torch.no_grad()
    def generate(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> DiscreteAdversarialBatch:
        """The discrete adversarial batch and how many of its codes differ from the clean image's.

        Args:
            model: The classifier (taking normalised input; DDP wrappers are bypassed by the attack).
            x: Images in the model's input space, as the loader gives them.
            target: Class indices or soft targets (mixup / cutmix).
        """
        x = x.detach()
        # clamped here, so the VQGAN's own range checks (host syncs) are skipped
        x_pix = self.normalizer.to_pixel(x).float().clamp(0.0, 1.0)
        with self._vqgan_context(x):
            codes = self.vqgan.encode(x_pix, check_range=False)
            x_rec = self.vqgan.decode(codes, check_range=False).float()
        # re-clamped: (x_rec + delta) can exceed [0, 1] by a rounding error after the attack's projection
        attacked = (x_rec + self.attack.perturb(model, x_rec, target)).clamp(0.0, 1.0)
        with self._vqgan_context(x):
            adv_codes = self.vqgan.encode(attacked, check_range=False)
            diff = adv_codes != codes
            changed = diff.flatten(1).any(dim=1)
            index = changed.nonzero().squeeze(1)  # the step's one host sync: how many samples to decode
            if index.numel() == changed.numel():
                x_dat = self.vqgan.decode(adv_codes, check_range=False).float()
            else:
                x_dat = x_rec.clone()
                if index.numel():
                    x_dat.index_copy_(0, index, self.vqgan.decode(adv_codes[index], check_range=False).float())
        images = self.normalizer.from_pixel(x_dat).to(dtype=x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        return DiscreteAdversarialBatch(images, diff.float().mean(), changed.float().mean(), attacked)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Discrete adversarial images, in the same space, shape and dtype as ``x``, detached."""
        return self.generate(model, x, target).images

    def __repr__(self) -> str:
        return f'DiscreteAdversarialAugment(vqgan={type(self.vqgan).__name__}, attack={self.attack!r})'

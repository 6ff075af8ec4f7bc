"""taming-transformers' VQModel without PyTorch Lightning: the network whose keys the checkpoints hold.

``taming.models.vqgan`` imports PyTorch Lightning APIs that no longer exist, so the model is
assembled here from taming's modules (``Encoder``, ``Decoder``, ``VectorQuantizer2``) plus the two
1x1 convolutions. Submodule names equal taming's and latent-diffusion's, so their ``state_dict``
loads key for key.
"""
import contextlib
import io
from typing import Tuple

import torch
import torch.nn as nn
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from .config import VQGANConfig

__all__ = ['VQModel']

# distances held at once by the quantiser (latents x codes): bounds memory for 16384-code books
_MAX_DISTANCES = 1 << 26


class VQModel(nn.Module):
    """Encoder -> quant_conv -> nearest codebook vector -> post_quant_conv -> Decoder, on images in [-1, 1].

    Args:
        config: Architecture.
        beta: Commitment weight of the quantiser loss (taming's default 0.25).
        legacy: taming's ``legacy=True`` weighs the codebook term by beta instead of the commitment
            term; checkpoints do not depend on it. Fitting uses the VQ-VAE form (``legacy=False``).

    Example:
        >>> model = VQModel(load_vqgan_config('vq-f8'))
        >>> rec, qloss, codes = model(torch.rand(1, 3, 64, 64) * 2 - 1)
    """

    def __init__(self, config: VQGANConfig, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.config = config
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the latent shape
            self.encoder = Encoder(**config.ddconfig)
            self.decoder = Decoder(**config.ddconfig)
        self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=beta, legacy=legacy,
                                         sane_index_shape=True)
        z_channels = config.ddconfig['z_channels']
        self.quant_conv = nn.Conv2d(z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, z_channels, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents (B, embed_dim, h, w) before quantisation."""
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest codebook vectors in fp32: (straight-through z_q, quantiser loss, indices B x h x w)."""
        with torch.autocast(h.device.type, enabled=False):
            z_q, loss, (_, _, indices) = self.quantize(h.float())
        return z_q, loss, indices

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codebook vectors, computed in batch chunks to bound memory."""
        per_image = h.shape[2] * h.shape[3] * self.config.n_embed
        chunk = max(1, _MAX_DISTANCES // per_image)
        return torch.cat([self.quantize_latent(part)[2] for part in h.split(chunk)])

    def codes_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (B, embed_dim, h, w) of an index map (B, h, w)."""
        b, h, w = indices.shape
        return self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.config.embed_dim))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (not clamped) from quantised latents."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, quantiser loss, indices); gradients reach the encoder straight through."""
        z_q, qloss, indices = self.quantize_latent(self.encode_latent(x))
        return self.decode_latent(z_q), qloss, indices

"""A frozen VQGAN that maps images in [0, 1] to discrete codes and back (what DAT trains on)."""
import contextlib
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from .model import VQModel

__all__ = ['VQGANDiscretizer', 'compare_precision']


class VQGANDiscretizer(nn.Module):
    """Frozen VQGAN: ``encode`` images to code indices, ``decode`` indices to images, ``reconstruct`` both.

    Images are in [0, 1]; the network sees ``2x - 1`` and its output is clamped to [-1, 1] and mapped
    back with ``(y + 1) / 2``, as in the official DAT code. Everything runs under ``no_grad`` and the
    module stays in eval mode even inside a model switched to ``train()``. The quantiser (nearest
    codebook vector) always runs in fp32: in bf16 the distances to 16384 codes tie and flip indices.

    Encoder and decoder run on at most ``chunk_size`` images at a time: taming's encoder keeps every
    block's output until it ends (about 0.2 GB per 224 px image for vq-f8 in fp32, see
    :func:`~timm_adv.vqgan.vqgan_activation_bytes`), so a whole training batch can exceed GPU memory. With
    ``static_batch`` (set by ``compile_vqgan``) every pass is padded to ``chunk_size`` images, the first
    batch's size when unset, so that a compiled VQGAN sees one shape and compiles once.

    Args:
        model: The network (weights already loaded).
        source: What it was created from (preset, path, ``hf-hub:``/``local-dir:`` name).
        weights: Weights file it was loaded from, if any.
        weights_sha256: That file's SHA-256, to tell two VQGANs apart in checkpoints and model cards.
        bf16: Run encoder and decoder under bf16 autocast.
        channels_last: Run encoder and decoder in channels_last memory format (decoded images come out in it).
        chunk_size: Images per encoder / decoder pass; None runs the whole batch at once.

    Example:
        >>> vq = create_vqgan('vqgan_mnist')
        >>> codes = vq.encode(images)            # LongTensor (B, H / f, W / f)
        >>> images_rec = vq.decode(codes)        # == vq.reconstruct(images), in [0, 1]
    """

    def __init__(self, model: VQModel, source: str = '', weights: Optional[str] = None,
                 weights_sha256: Optional[str] = None, bf16: bool = False, channels_last: bool = False,
                 chunk_size: Optional[int] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.downsample_factor: int = model.config.downsample_factor
        self.source = source
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.bf16 = bool(bf16)
        self.channels_last = False
        self.set_channels_last(channels_last)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f'VQGAN chunk_size must be >= 1 or None (whole batch), got {chunk_size}.')
        self.chunk_size = chunk_size
        self.static_batch = False

    def train(self, mode: bool = True) -> 'VQGANDiscretizer':
        """Stays in eval mode: the VQGAN is frozen whatever the surrounding model does."""
        return super().train(False)

    def set_channels_last(self, enable: bool = True) -> 'VQGANDiscretizer':
        self.channels_last = bool(enable)
        self.model.to(memory_format=torch.channels_last if enable else torch.contiguous_format)
        return self

    @property
    def n_embed(self) -> int:
        return self.config.n_embed

    def describe(self) -> Dict[str, Any]:
        """Identity of this VQGAN in plain types (for a checkpoint's task state or a model card)."""
        return dict(source=self.source, weights=self.weights, weights_sha256=self.weights_sha256,
                    config=self.config.params(), downsample_factor=self.downsample_factor, n_embed=self.n_embed,
                    embed_dim=self.config.embed_dim, bf16=self.bf16, channels_last=self.channels_last,
                    chunk_size=self.chunk_size)

    def check_images(self, x: torch.Tensor, check_range: bool = True) -> None:
        """Raises ValueError unless ``x`` is a float batch (B, C, H, W) in [0, 1] with H, W multiples of the factor.

        The range check reads the values back to the host (a device sync); ``check_range=False`` skips it.
        """
        in_ch = self.config.ddconfig['in_channels']
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != in_ch or not x.is_floating_point():
            raise ValueError(f'VQGAN input must be a float tensor (B, {in_ch}, H, W), got '
                             f'{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}.')
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f'VQGAN input is {x.shape[2]}x{x.shape[3]} px; this VQGAN downsamples by {f}, so height '
                             f'and width must be multiples of {f} (set the image size, e.g. --img-size / '
                             f'--input-size, to one).')
        if not check_range:
            return
        lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f'VQGAN input must be images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; clamp '
                             f'first (random erasing with normal noise and normalised tensors leave [0, 1]).')

    def _autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _in_chunks(self, net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``net`` over ``x`` in chunks of ``chunk_size`` images (padded to it with ``static_batch``)."""
        if self.static_batch and self.chunk_size is None:
            self.chunk_size = x.shape[0]  # the first batch fixes the one shape a compiled VQGAN sees
        size = self.chunk_size or x.shape[0]
        outputs = []
        for part in x.split(size):
            n = part.shape[0]
            if self.static_batch and n < size:
                part = torch.cat([part, part.new_zeros((size - n, *part.shape[1:]))])
            outputs.append(net(self._format(part))[:n])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x.device):
            h = self._in_chunks(self.model.encode_latent, x.float() * 2 - 1)
        return self.model.codes(h)

    def _decode(self, indices: torch.Tensor) -> torch.Tensor:
        z_q = self.model.codes_to_latent(indices)
        with self._autocast(z_q.device):
            y = self._in_chunks(self.model.decode_latent, z_q)
        images = (y.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        return images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Code indices (B, H / f, W / f), int64, of images ``x`` (B, C, H, W) in [0, 1].

        ``check_range=False`` skips the [0, 1] check and its device sync (for inputs clamped already).
        """
        self.check_images(x, check_range)
        return self._encode(x)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Images (B, C, h * f, w * f) in [0, 1] from code indices (B, h, w).

        ``check_range=False`` skips the codebook-range check and its device sync (for codes from ``encode``).
        """
        if not torch.is_tensor(indices) or indices.ndim != 3 or indices.dtype != torch.long:
            raise ValueError(f'VQGAN codes must be an int64 tensor (B, h, w), got '
                             f'{tuple(indices.shape) if torch.is_tensor(indices) else type(indices).__name__}'
                             f'{" " + str(indices.dtype) if torch.is_tensor(indices) else ""}.')
        if check_range and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_embed):
            raise ValueError(f'VQGAN codes must lie in [0, {self.n_embed}), got [{int(indices.min())}, '
                             f'{int(indices.max())}].')
        return self._decode(indices)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``: images in [0, 1] snapped to the codebook, same shape as ``x``."""
        self.check_images(x)
        return self._decode(self._encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


@torch.no_grad()
def compare_precision(discretizer: VQGANDiscretizer, x: torch.Tensor) -> Dict[str, float]:
    """bf16 autocast against fp32 on the same images: pixel errors and the fraction of identical codes.

    ``decode_max_abs_error`` decodes the fp32 codes in both precisions, isolating the decoder's
    rounding from code flips in the encoder.

    Example:
        >>> compare_precision(create_vqgan('vqgan_mnist'), images)['code_agreement']
    """
    saved = discretizer.bf16
    try:
        discretizer.bf16 = False
        codes32 = discretizer.encode(x)
        rec32 = discretizer.decode(codes32)
        discretizer.bf16 = True
        codes16 = discretizer.encode(x)
        rec16 = discretizer.decode(codes16)
        dec16 = discretizer.decode(codes32)
    finally:
        discretizer.bf16 = saved
    err = (rec16 - rec32).abs()
    return dict(max_abs_pixel_error=float(err.max()), mean_abs_pixel_error=float(err.mean()),
                code_agreement=float((codes16 == codes32).float().mean()),
                decode_max_abs_error=float((dec16 - rec32).abs().max()), images=int(x.shape[0]))

"""The FGSM-SDI initialisation generator (Jia et al., IEEE TIP 2022).

A small fully convolutional network maps an image and the sign of its input gradient to a
perturbation inside the L-inf ball: the sample-dependent starting point of one FGSM step. It is
trained jointly with (and against) the classifier and discarded at inference.

Architecture (the official default): concat(x, sign(grad)) -> conv3x3 to ``width`` channels, BN,
ReLU -> one pre-activation residual block (BN without affine, PReLU) -> BN without affine ->
conv3x3 to the image channels -> tanh * eps. It works for any channel count and image size.
"""
import math

import torch
import torch.nn as nn

from timm_adv.utils.errors import ParameterError

__all__ = ['PreActResBlock', 'SDIGenerator', 'create_sdi_generator']


class PreActResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(act(bn(conv(act(bn(x))))))`` with an identity shortcut.

    Args:
        channels: Input and output channels.
        act_layer: Activation class (PReLU in FGSM-SDI).
    """

    def __init__(self, channels: int, act_layer: type = nn.PReLU):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, affine=False)
        self.act1 = act_layer()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels, affine=False)
        self.act2 = act_layer()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        # Xavier with ReLU-family gain, as the reference generator initialises its residual convolutions.
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight, gain=math.sqrt(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.bn1(x)))
        h = self.conv2(self.act2(self.bn2(h)))
        return x + h


class SDIGenerator(nn.Module):
    """Generates a sample-dependent initial perturbation ``delta0`` with ``||delta0||_inf < eps``.

    Args:
        eps: L-inf radius of the output, in pixel units (e.g. ``8/255``).
        in_chans: Image channels; the network reads ``2 * in_chans`` (image and gradient sign).
        width: Hidden channels.

    Example:
        >>> gen = SDIGenerator(eps=8 / 255, in_chans=3)
        >>> delta0 = gen(x, grad_sign)          # [B, 3, H, W], |delta0| < 8/255
    """

    def __init__(self, eps: float, in_chans: int = 3, width: int = 64):
        super().__init__()
        if not eps > 0:
            raise ParameterError('eps', f'must be > 0, got {eps}.')
        if in_chans < 1 or width < 1:
            raise ValueError(f'SDIGenerator needs in_chans >= 1 and width >= 1, got {in_chans}, {width} '
                             f'(--in-chans / --adv-sdi-width).')
        self.eps = float(eps)
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            nn.Conv2d(2 * in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-3),
            nn.ReLU(inplace=True),
        )
        self.block = PreActResBlock(width)
        self.norm = nn.BatchNorm2d(width, affine=False)
        self.head = nn.Conv2d(width, in_chans, 3, padding=1)

    def forward(self, x: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
        """Perturbation for images ``x`` given the sign of their input gradient (same shape as ``x``)."""
        if x.shape[1] != self.in_chans or grad_sign.shape != x.shape:
            raise ValueError(f'SDIGenerator expects image and gradient sign of shape [B, {self.in_chans}, H, W], '
                             f'got {tuple(x.shape)} and {tuple(grad_sign.shape)}; set --in-chans to the image channels.')
        h = self.stem(torch.cat([x, grad_sign], dim=1))
        h = self.head(self.norm(self.block(h)))
        return torch.tanh(h) * self.eps


def create_sdi_generator(eps: float, in_chans: int = 3, width: int = 64, **kwargs) -> SDIGenerator:
    """Creates the FGSM-SDI initialisation generator.

    Example:
        >>> gen = create_sdi_generator(eps=8 / 255, in_chans=1)   # grayscale images
    """
    return SDIGenerator(eps=eps, in_chans=in_chans, width=width, **kwargs)

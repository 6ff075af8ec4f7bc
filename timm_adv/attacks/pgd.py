"""The attack core: FGSM and PGD under L-inf and L2, in pixel space, input gradients only.

Every method in timm-adv generates its adversarial examples through this module. The maths is kept
in small functions (``random_init``, ``ascent_step``, ``project``, ``input_gradient``) so that
methods with a custom starting point (FGSM-SDI's generator) or a custom step reuse them.

Conventions:
    * Images are attacked in pixel space [0, 1]. ``x`` handed to an attack is in the model's input
      space; a :class:`PixelNormalizer` converts it exactly, and the adversarial batch is returned in
      the same space as ``x``.
    * Only the gradient w.r.t. the perturbation is computed (``torch.autograd.grad``, parameters
      frozen by :func:`.frozen_parameters` so that a compiled model skips them too): parameter
      ``.grad`` is never touched, weight-gradient kernels are skipped, and DDP wrappers are bypassed
      so no all-reduce fires.
    * BN behaviour during the attack is an explicit argument (see :mod:`.bn_mode`).
    * Precision is decided here, for every method (:func:`attack_precision`): attack passes run in fp32
      even inside a training autocast, as the official codes of DAT and PGD-AT do; under fp16 autocast no
      loss scaler guards the input gradient, which can underflow. ``autocast=True`` keeps the training
      autocast (faster, ``--adv-attack-amp``).
"""
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from timm_adv.utils.errors import ParameterError

from .bn_mode import attack_bn_mode, check_bn_mode
from .frozen import frozen_parameters
from .normalize import PixelNormalizer

__all__ = [
    'NORMS', 'TARGETINGS', 'LossFn', 'unwrap_ddp', 'per_sample_norm', 'random_init', 'project',
    'ascent_step', 'input_gradient', 'select_target', 'hard_labels', 'attack_precision', 'PGDAttack',
]

NORMS = ('linf', 'l2')
#: ``random``: a uniformly drawn wrong class; ``least_likely``: the lowest-scoring class.
TARGETINGS = (None, 'random', 'least_likely')

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper: attack passes must not trigger gradient sync."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def attack_precision(device_type: str, autocast: bool = False):
    """The context every attack pass runs in: autocast off (fp32 with fp32 weights) unless ``autocast``.

    Example:
        >>> with torch.autocast('cuda', dtype=torch.float16), attack_precision('cuda'):
        ...     logits = model(x)   # fp32
    """
    if autocast or not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def per_sample_norm(t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def random_init(x: torch.Tensor, eps: float, norm: str = 'linf', on_sphere: bool = False) -> torch.Tensor:
    """A random perturbation in the eps ball (uniform in the L-inf cube, uniform in the L2 ball).

    With ``on_sphere`` it lies on the ball's surface: L2 at distance exactly eps in a uniformly drawn
    direction (DAT's start), L-inf at a random vertex (every coordinate +-eps).
    """
    if norm == 'linf':
        if on_sphere:
            return eps * (torch.randint_like(x, 0, 2) * 2 - 1)
        return torch.empty_like(x).uniform_(-eps, eps)
    direction = torch.randn_like(x)
    direction = direction / per_sample_norm(direction).clamp_min(1e-12)
    if on_sphere:
        return eps * direction
    dim = x[0].numel()
    radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / dim)
    return direction * radius.view(-1, *([1] * (x.ndim - 1)))


def project(delta: torch.Tensor, x_pix: Optional[torch.Tensor], eps: float, norm: str = 'linf',
            clamp: bool = True) -> torch.Tensor:
    """Projects ``delta`` onto the eps ball and, with ``clamp``, keeps ``x_pix + delta`` in [0, 1].

    ``x_pix`` is only read with ``clamp``; pass None to project a perturbation that is not an image's.
    """
    if norm == 'linf':
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    if clamp:
        delta = (x_pix + delta).clamp(0.0, 1.0) - x_pix
    return delta


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str = 'linf') -> torch.Tensor:
    """One steepest-ascent step: signed gradient for L-inf, per-sample unit gradient for L2."""
    if norm == 'linf':
        return delta + step_size * grad.sign()
    return delta + step_size * grad / per_sample_norm(grad).clamp_min(1e-12)


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices from hard labels or soft (mixup / smoothed) targets."""
    return target.argmax(dim=1) if target.ndim == 2 else target


def select_target(logits: torch.Tensor, target: torch.Tensor, how: str) -> torch.Tensor:
    """Chooses the class a targeted attack pushes toward.

    Args:
        logits: Model logits ``[B, C]`` used for ``least_likely``.
        target: True labels (indices or soft targets).
        how: ``random`` (a uniformly drawn class other than the true one) or ``least_likely``.
    """
    labels = hard_labels(target)
    if how == 'least_likely':
        return logits.detach().argmin(dim=1)
    if how == 'random':
        num_classes = logits.shape[1]
        offset = torch.randint(1, num_classes, labels.shape, device=labels.device)
        return (labels + offset) % num_classes
    raise ValueError(f'Unknown targeting {how!r}; choose one of random, least_likely.')


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # F.cross_entropy takes class indices or class probabilities (mixup / cutmix soft targets).
    return F.cross_entropy(logits.float(), target, reduction='none')


def input_gradient(
        model: nn.Module,
        x_pix: torch.Tensor,
        delta: torch.Tensor,
        target: torch.Tensor,
        normalizer: PixelNormalizer,
        loss_fn: LossFn = _cross_entropy,
        targeted: bool = False,
        autocast: bool = False,
):
    """Gradient of the attack objective w.r.t. ``delta`` only, plus the logits it saw.

    The objective is the summed per-sample loss (so each sample's gradient is independent of the
    batch size), negated for targeted attacks so that ascent moves toward the target class. The
    forward and backward run in fp32 unless ``autocast`` (see :func:`attack_precision`).

    Returns:
        ``(grad, logits)`` with ``grad`` shaped like ``delta`` and ``logits`` detached.
    """
    delta = delta.detach().requires_grad_(True)
    with attack_precision(x_pix.device.type, autocast):
        logits = model(normalizer.from_pixel(x_pix + delta))
        loss = loss_fn(logits, target).sum()
        if targeted:
            loss = -loss
    grad, = torch.autograd.grad(loss, delta)
    return grad, logits.detach()


class PGDAttack:
    """Projected gradient descent (Madry et al.) and FGSM (``steps=1``), L-inf or L2.

    Args:
        eps: Radius of the threat model in pixel units (e.g. ``8/255``).
        steps: Number of gradient steps (1 with no random start is FGSM).
        step_size: Step length; defaults to ``eps`` for one step and ``2.5 * eps / steps`` otherwise.
        norm: ``linf`` or ``l2``.
        random_start: Start from a random point of the eps ball.
        start_prob: Probability, drawn once per batch, that the random start is used (DAT: 0.8);
            otherwise the attack starts at the clean image.
        start_on_sphere: Draw the random start on the surface of the eps ball (see :func:`random_init`).
        targeted: ``None`` (untargeted), ``random`` or ``least_likely``; an explicit target can also
            be passed to :meth:`__call__`.
        loss_fn: Per-sample loss ``(logits, target) -> [B]``; cross-entropy on hard or soft targets
            by default.
        bn_mode: BN behaviour during the attack, one of ``BN_MODES`` (default ``eval``).
        mean: Loader normalisation mean, or None when the model takes pixels.
        std: Loader normalisation std.
        restarts: Independent random restarts; the strongest per sample is kept.
        clamp: Keep adversarial images in [0, 1].
        num_classes: Class count, lets ``targeted='random'`` draw targets without a clean forward.
        autocast: Run the attack under the surrounding (training) autocast instead of fp32 (see
            :func:`attack_precision`).

    Example:
        >>> attack = PGDAttack(eps=8 / 255, steps=10, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        >>> x_adv = attack(model, x, y)   # same space as x, ||to_pixel(x_adv) - to_pixel(x)||_inf <= eps
    """

    def __init__(
            self,
            eps: float,
            steps: int = 10,
            step_size: Optional[float] = None,
            norm: str = 'linf',
            random_start: bool = True,
            targeted: Optional[str] = None,
            loss_fn: Optional[LossFn] = None,
            bn_mode: str = 'eval',
            mean=None,
            std=None,
            restarts: int = 1,
            clamp: bool = True,
            num_classes: Optional[int] = None,
            start_prob: float = 1.0,
            start_on_sphere: bool = False,
            autocast: bool = False,
    ):
        if not eps > 0:
            raise ParameterError('eps', f'must be > 0, got {eps} (e.g. 8/255).')
        if int(steps) != steps or steps < 1:
            raise ParameterError('steps', f'must be an integer >= 1, got {steps}.')
        if norm not in NORMS:
            raise ParameterError('norm', f'must be one of {", ".join(NORMS)}, got {norm!r}.')
        if targeted not in TARGETINGS:
            raise ParameterError('targeted', f'names an unknown targeting {targeted!r}; choose random, least_likely or '
                                             f'None.')
        if restarts < 1:
            raise ParameterError('restarts', f'must be >= 1, got {restarts}.')
        if not 0.0 <= start_prob <= 1.0:
            raise ParameterError('start_prob', f'must be in [0, 1], got {start_prob} (the chance of a random start).')
        if step_size is None:
            step_size = eps if steps == 1 else 2.5 * eps / steps
        if not step_size > 0:
            raise ParameterError('step_size', f'must be > 0, got {step_size}.')
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.norm = norm
        self.random_start = random_start
        self.start_prob = float(start_prob)
        self.start_on_sphere = start_on_sphere
        self.targeted = targeted
        self.loss_fn = loss_fn or _cross_entropy
        self.bn_mode = check_bn_mode(bn_mode)
        self.normalizer = PixelNormalizer(mean, std)
        self.restarts = int(restarts)
        self.clamp = clamp
        self.num_classes = num_classes
        self.autocast = bool(autocast)

    def perturb(
            self,
            model: nn.Module,
            x_pix: torch.Tensor,
            target: torch.Tensor,
            attack_target: Optional[torch.Tensor] = None,
            init: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Runs the attack in pixel space and returns the perturbation ``delta`` (detached).

        Args:
            model: Model taking normalised input; it is run in ``bn_mode`` and restored after.
            x_pix: Clean images in [0, 1].
            target: True labels or soft targets.
            attack_target: Explicit target classes for a targeted attack.
            init: Starting perturbation (overrides the random start), e.g. a learned initialisation.
        """
        model = unwrap_ddp(model)
        x_pix = x_pix.detach()
        targeted = attack_target is not None or self.targeted is not None
        with attack_bn_mode(model, self.bn_mode), frozen_parameters(model), torch.enable_grad(), \
                attack_precision(x_pix.device.type, self.autocast):
            best_delta, best_score = None, None
            goal = attack_target
            if goal is None and self.targeted is not None:
                goal = self._choose_target(model, x_pix, target)
            for _ in range(self.restarts):
                if init is not None:
                    delta = init.detach()
                elif self._use_random_start():
                    delta = random_init(x_pix, self.eps, self.norm, self.start_on_sphere)
                else:
                    delta = torch.zeros_like(x_pix)
                delta = project(delta, x_pix, self.eps, self.norm, self.clamp)
                for _ in range(self.steps):
                    grad, _ = input_gradient(model, x_pix, delta, goal if targeted else target, self.normalizer,
                                             self.loss_fn, targeted, self.autocast)
                    delta = project(ascent_step(delta, grad, self.step_size, self.norm), x_pix, self.eps, self.norm,
                                    self.clamp)
                if self.restarts == 1:
                    return delta.detach()
                best_delta, best_score = self._keep_strongest(
                    model, x_pix, delta, target, goal, targeted, best_delta, best_score)
        return best_delta.detach()

    def _use_random_start(self) -> bool:
        if not self.random_start or self.start_prob == 0.0:
            return False
        # one draw per batch, from torch's generator so that seeded runs replay it
        return self.start_prob == 1.0 or bool(torch.rand(()) < self.start_prob)

    @torch.no_grad()
    def _choose_target(self, model: nn.Module, x_pix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.targeted == 'random' and self.num_classes is not None:
            labels = hard_labels(target)
            offset = torch.randint(1, self.num_classes, labels.shape, device=labels.device)
            return (labels + offset) % self.num_classes
        # least-likely needs the clean prediction; random needs the class count from the logits
        return select_target(model(self.normalizer.from_pixel(x_pix)), target, self.targeted)

    @torch.no_grad()
    def _keep_strongest(self, model, x_pix, delta, target, goal, targeted, best_delta, best_score):
        logits = model(self.normalizer.from_pixel(x_pix + delta))
        loss = self.loss_fn(logits, goal if targeted else target)
        success = logits.argmax(1) == goal if targeted else logits.argmax(1) != hard_labels(target)
        # successful samples rank above failed ones; among equals the stronger loss wins
        score = success.float() * 1e6 + (-loss if targeted else loss)
        if best_delta is None:
            return delta, score
        better = (score > best_score).view(-1, *([1] * (delta.ndim - 1)))
        return torch.where(better, delta, best_delta), torch.maximum(score, best_score)

    def __call__(
            self,
            model: nn.Module,
            x: torch.Tensor,
            target: torch.Tensor,
            attack_target: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Adversarial version of ``x``, in the same (normalised) space as ``x``, detached."""
        x_pix = self.normalizer.to_pixel(x.detach())
        delta = self.perturb(model, x_pix, target, attack_target)
        return self.normalizer.from_pixel(x_pix + delta).detach()

    def __repr__(self) -> str:
        return (f'PGDAttack(eps={self.eps:.5g}, steps={self.steps}, step_size={self.step_size:.5g}, '
                f'norm={self.norm}, random_start={self._start_repr()}, targeted={self.targeted}, '
                f'bn_mode={self.bn_mode}, restarts={self.restarts}{", autocast" if self.autocast else ""})')

    def _start_repr(self) -> str:
        if not self.random_start or (not self.start_on_sphere and self.start_prob == 1.0):
            return str(self.random_start)
        return ('sphere' if self.start_on_sphere else 'ball') + (f' p={self.start_prob:g}' if self.start_prob < 1 else '')

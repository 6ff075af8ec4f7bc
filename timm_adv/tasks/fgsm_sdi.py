"""FGSM-SDI: fast adversarial training with a learnable, sample-dependent initialisation.

Jia et al., "Boosting Fast Adversarial Training with Learnable Adversarial Initialization",
IEEE TIP 2022. Per batch (about three forward-backward passes):

1. ``g = grad_x CE(f(x), y)`` (input gradient only);
2. ``delta0 = G(x, sign(g))``, a perturbation in the eps ball from the generator (eval mode), which
   reads the model's (normalised) input ``x`` as the official code does;
3. one FGSM step from ``x + delta0``: ``delta = clip_eps(delta0 + alpha * sign(grad CE(f(x + delta0))))``,
   and ``x + delta`` clipped to [0, 1] unless ``--no-adv-sdi-clamp`` (the official code does not clip);
4. the model's loss is a label-smoothed CE on ``x + delta`` (the true class keeps probability
   ``confidence``, 0.5 officially; the rest is shared by the other classes, for any class count).

Every ``k`` batches (20 officially) the generator, in train mode, is first updated by its own
Adam optimiser to *maximise* the same loss; its gradient flows only through ``delta0`` (the FGSM
step direction is a constant) and is taken with ``torch.autograd.grad`` w.r.t. its parameters, so
the model's ``.grad`` is never touched. The generator, its optimiser and the batch counter are
task state (saved in checkpoints, restored on ``--resume``; ``--no-resume-opt`` leaves the Adam state
fresh), never part of the exported model.

Distributed: rank 0's generator is broadcast when the task is wrapped for DDP; after each generator
step its gradients are averaged before the Adam step and its BN running statistics right after, so
every process holds the same generator. Mixed precision: under fp16 autocast the generator step runs
in fp32 (its gradient would otherwise pass unscaled through fp16 activations and underflow); bf16
keeps autocast.

BN: the model stays in train mode for every pass, as in the official code; the attack passes
(input gradient, FGSM step, generator objective) normalise with batch statistics and leave the
running statistics alone by default (``--adv-bn-mode train``); ``train_update`` reproduces the
official code, where every pass updates them.
"""
import argparse
import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm_adv.attacks import PGDAttack, ascent_step, attack_bn_mode, frozen_parameters, input_gradient, project
from timm_adv.models import create_sdi_generator
from .base import AdversarialTask, top1
from .registry import register_method

__all__ = ['FGSMSDITask', 'SDI_DEFAULTS', 'smooth_targets', 'smoothed_cross_entropy']

_logger = logging.getLogger(__name__)

#: ``--adv-sdi-*`` defaults: the official settings (``add_args``, ``from_args`` and ``__init__`` read them).
SDI_DEFAULTS: Dict[str, Any] = dict(adv_sdi_every=20, adv_sdi_lr=1e-3, adv_sdi_weight_decay=5e-4, adv_sdi_width=64,
                                    adv_sdi_label_confidence=0.5, adv_sdi_clamp=True)


def smooth_targets(target: torch.Tensor, num_classes: int, confidence: float = 0.5) -> torch.Tensor:
    """Label-smoothed class probabilities: the true class keeps ``confidence``, the other
    ``num_classes - 1`` classes share ``1 - confidence`` equally (FGSM-SDI's ``factor``).

    Soft targets (mixup / cutmix) are smoothed the same way, class by class:
    ``p * confidence + (1 - p) * (1 - confidence) / (num_classes - 1)``.

    Example:
        >>> smooth_targets(torch.tensor([2]), 4, 0.5)
        tensor([[0.1667, 0.1667, 0.5000, 0.1667]])
    """
    if num_classes < 2:
        raise ValueError(f'label smoothing needs at least 2 classes, got {num_classes} (--num-classes).')
    if target.ndim == 1:
        target = F.one_hot(target, num_classes)
    target = target.float()
    return target * confidence + (1.0 - target) * ((1.0 - confidence) / (num_classes - 1))


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, confidence: float = 0.5) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against :func:`smooth_targets` of ``target``."""
    probs = smooth_targets(target, logits.shape[1], confidence)
    return -(probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _average_across_processes(tensors: Iterable[torch.Tensor]) -> None:
    """Replaces each tensor by its mean over the processes (a no-op without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def _no_fp16_autocast(device_type: str):
    """Disables fp16 autocast (no loss scaling reaches the generator's backward); bf16 is left on."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


@register_method('fgsm-sdi')
class FGSMSDITask(AdversarialTask):
    """FGSM-SDI adversarial training (see the module docstring for the algorithm).

    Args:
        model: Model to train.
        criterion: Unused by the adversarial loss (FGSM-SDI trains on its own label-smoothed CE); kept for
            the common task interface.
        attack: Single-step L-inf attack carrying eps, the step size alpha, the BN mode of the attack
            passes, the input normalisation and whether images are clamped to [0, 1].
        generator: The initialisation generator (see :class:`~timm_adv.models.SDIGenerator`).
        generator_lr: Adam learning rate of the generator.
        generator_weight_decay: Adam (L2) weight decay of the generator.
        generator_every: Update the generator every this many batches.
        label_confidence: Probability the smoothed target keeps on the true class.

    Example:
        >>> attack = PGDAttack(eps=8 / 255, steps=1, random_start=False, bn_mode='train', mean=mean, std=std)
        >>> task = FGSMSDITask(model, None, attack, create_sdi_generator(8 / 255, in_chans=3))
        >>> task(x, y)['loss'].backward()
    """

    paper = 'Boosting Fast Adversarial Training with Learnable Adversarial Initialization (Jia et al., IEEE TIP 2022)'
    url = 'https://arxiv.org/abs/2110.05007'
    citation = ('@article{jia2022boosting,\n  title = {Boosting Fast Adversarial Training with Learnable Adversarial '
                'Initialization},\n  author = {Jia, Xiaojun and Zhang, Yong and Wu, Baoyuan and Wang, Jue and Cao, '
                'Xiaochun},\n  journal = {IEEE Transactions on Image Processing},\n  year = {2022}\n}')

    default_bn_mode = 'train'
    #: One L-inf step from the generator's start: steps, norm, random start and targeting are fixed.
    uses_args = ('adv_eps', 'adv_step_size', 'adv_bn_mode')
    attack_defaults = dict(eps=8 / 255, steps=1, norm='linf', random_start=False)
    #: Fast single-step methods are prone to catastrophic overfitting: guard them by default.
    co_guard_default = True
    flag_defaults = SDI_DEFAULTS

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]],
            attack: PGDAttack,
            generator: nn.Module,
            generator_lr: float = SDI_DEFAULTS['adv_sdi_lr'],
            generator_weight_decay: float = SDI_DEFAULTS['adv_sdi_weight_decay'],
            generator_every: int = SDI_DEFAULTS['adv_sdi_every'],
            label_confidence: float = SDI_DEFAULTS['adv_sdi_label_confidence'],
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, attack=attack, device=device, dtype=dtype, verbose=verbose)
        if attack.norm != 'linf' or attack.steps != 1 or attack.random_start:
            raise ValueError('fgsm-sdi is a single-step L-inf method starting from the generator: drop --adv-norm l2, '
                             '--adv-steps and --adv-random-start.')
        if generator_every < 1:
            raise ValueError(f'--adv-sdi-every must be >= 1, got {generator_every}.')
        if not 0.0 < label_confidence <= 1.0:
            raise ValueError(f'--adv-sdi-label-confidence must be in (0, 1], got {label_confidence}.')
        if not generator_lr > 0:
            raise ValueError(f'--adv-sdi-lr must be > 0, got {generator_lr}.')
        if attack.step_size > attack.eps:
            _logger.warning(f'FGSM-SDI: --adv-step-size {attack.step_size:.5g} is larger than eps {attack.eps:.5g}; '
                            f'the FGSM step is clipped to the eps ball (as in the official code), so the step '
                            f'taken is eps.')
        self.generator = generator
        self.generator_optimizer = torch.optim.Adam(
            generator.parameters(), lr=generator_lr, weight_decay=generator_weight_decay)
        self.generator_every = int(generator_every)
        self.label_confidence = float(label_confidence)
        self.batches_seen = 0
        if verbose:
            _logger.info(f'FGSM-SDI: generator updated every {generator_every} batches (Adam lr {generator_lr}, '
                         f'wd {generator_weight_decay}); label-smoothed CE keeps {label_confidence} on the true '
                         f'class (the training criterion, e.g. --smoothing, is not used).')

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        d = cls.flag_defaults
        group.add_argument('--adv-sdi-every', type=int, default=d['adv_sdi_every'], metavar='K',
                           help='fgsm-sdi: update the initialisation generator every K batches (default: %(default)s)')
        group.add_argument('--adv-sdi-lr', type=float, default=d['adv_sdi_lr'], metavar='LR',
                           help='fgsm-sdi: generator Adam learning rate (default: %(default)s)')
        group.add_argument('--adv-sdi-weight-decay', type=float, default=d['adv_sdi_weight_decay'], metavar='WD',
                           help='fgsm-sdi: generator Adam weight decay (default: %(default)s)')
        group.add_argument('--adv-sdi-width', type=int, default=d['adv_sdi_width'], metavar='C',
                           help='fgsm-sdi: generator hidden channels (default: %(default)s)')
        group.add_argument('--adv-sdi-label-confidence', type=float, default=d['adv_sdi_label_confidence'],
                           metavar='P',
                           help='fgsm-sdi: probability the label-smoothed target keeps on the true class, the '
                                "official 'factor' (default: %(default)s)")
        group.add_argument('--adv-sdi-clamp', action=argparse.BooleanOptionalAction, default=d['adv_sdi_clamp'],
                           help='fgsm-sdi: keep adversarial images in [0, 1]; --no-adv-sdi-clamp is the official '
                                'code (default: clamp)')

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None) -> 'FGSMSDITask':
        attack = cls.attack_from_args(args, mean, std, clamp=cls.setting(args, 'adv_sdi_clamp'))
        generator = create_sdi_generator(
            eps=attack.eps, in_chans=getattr(args, 'in_chans', None) or 3, width=cls.setting(args, 'adv_sdi_width'))
        return cls(
            model, criterion, attack, generator,
            generator_lr=cls.setting(args, 'adv_sdi_lr'),
            generator_weight_decay=cls.setting(args, 'adv_sdi_weight_decay'),
            generator_every=cls.setting(args, 'adv_sdi_every'),
            label_confidence=cls.setting(args, 'adv_sdi_label_confidence'),
            device=device,
        )

    def initial_perturbation(self, x: torch.Tensor, x_pix: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
        """``delta0`` from the generator, inside the eps ball (and the [0, 1] box when clamping)."""
        return project(self.generator(x, grad_sign), x_pix, self.attack.eps, clamp=self.attack.clamp)

    def adversarial_loss(self, model: nn.Module, x_pix: torch.Tensor, delta0: torch.Tensor, target: torch.Tensor):
        """One FGSM step from ``x + delta0``, then the label-smoothed CE of ``model`` there.

        Returns ``(loss, logits)``. The loss is differentiable w.r.t. ``delta0`` (the FGSM step direction
        is a constant) and, through the final forward, w.r.t. ``model``.
        """
        attack = self.attack
        attacked = self.attack_model
        with attack_bn_mode(attacked, attack.bn_mode), frozen_parameters(attacked), torch.enable_grad():
            grad, _ = input_gradient(attacked, x_pix, delta0, target, attack.normalizer, autocast=attack.autocast)
        # The official code clips the FGSM step alpha * sign(grad) to the eps ball before adding it.
        step = min(attack.step_size, attack.eps)
        delta = project(ascent_step(delta0, grad, step), x_pix, attack.eps, clamp=attack.clamp)
        logits = model(attack.normalizer.from_pixel(x_pix + delta))
        return smoothed_cross_entropy(logits, target, self.label_confidence), logits

    def generator_step(self, x: torch.Tensor, x_pix: torch.Tensor, grad_sign: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
        """One Adam step of the generator (train mode) maximising the adversarial loss; returns that loss.

        Runs in fp32 under fp16 autocast: no loss scaler guards this backward.
        """
        self.generator.train()
        attacked = self.attack_model
        with _no_fp16_autocast(x.device.type), attack_bn_mode(attacked, self.attack.bn_mode), \
                frozen_parameters(attacked), torch.enable_grad():
            delta0 = self.initial_perturbation(x, x_pix, grad_sign)
            loss, _ = self.adversarial_loss(attacked, x_pix, delta0, target)
            params = [p for p in self.generator.parameters() if p.requires_grad]
            # Gradients w.r.t. the generator only: the model's .grad stays untouched.
            grads = torch.autograd.grad(-loss, params)
        # one generator shared by all processes: average its gradient as DDP would
        _average_across_processes(grads)
        for p, g in zip(params, grads):
            p.grad = g
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        # each process normalised its own shard: average the running statistics so that they cannot drift
        _average_across_processes(b for b in self.generator.buffers() if b.is_floating_point())
        return loss.detach()

    def prepare_distributed(self, device_ids=None, **ddp_kwargs) -> 'FGSMSDITask':
        """Wraps the model in DDP and gives every process rank 0's generator (ranks seed differently)."""
        super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        if dist.is_available() and dist.is_initialized():
            for tensor in self.generator.state_dict().values():
                dist.broadcast(tensor, src=0)
        return self

    def ideal_cost(self) -> Dict[str, float]:
        # input gradient at x, the FGSM step from x + delta0, and every k batches one generator
        # step through the model; the generator's own layers are extra work on top
        return {'train_steps': 1.0, 'attack_passes': 2.0 + 1.0 / self.generator_every}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        attack = self.attack
        x = input.detach()
        x_pix = attack.normalizer.to_pixel(x)
        attacked = self.attack_model
        with attack_bn_mode(attacked, attack.bn_mode), frozen_parameters(attacked), torch.enable_grad():
            grad, _ = input_gradient(attacked, x_pix, torch.zeros_like(x_pix), target, attack.normalizer,
                                     autocast=attack.autocast)
        grad_sign = grad.sign()
        if self.batches_seen % self.generator_every == 0:
            self.generator_step(x, x_pix, grad_sign, target)
        self.batches_seen += 1

        self.generator.eval()
        with torch.no_grad():
            delta0 = self.initial_perturbation(x, x_pix, grad_sign)
        loss, output = self.adversarial_loss(self.trainable_module, x_pix, delta0, target)
        return {'loss': loss, 'output': output, 'top1_adv': top1(output, target)}

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema:
            return {}
        return {
            'generator': self.generator.state_dict(),
            'generator_optimizer': self.generator_optimizer.state_dict(),
            'batches_seen': self.batches_seen,
        }

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema:
            return
        if not state or 'generator' not in state:
            _logger.warning('FGSM-SDI: the checkpoint holds no generator state (another method?); the generator '
                            'starts fresh.')
            return
        self.generator.load_state_dict(state['generator'], strict=strict)
        if self.resume_optimizer_state:
            self.generator_optimizer.load_state_dict(state['generator_optimizer'])
        else:
            _logger.info('FGSM-SDI: generator Adam state not restored (--no-resume-opt).')
        self.batches_seen = int(state['batches_seen'])

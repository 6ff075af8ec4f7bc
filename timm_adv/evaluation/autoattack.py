"""Official AutoAttack (Croce & Hein, ICML 2020) through the ``pyautoattack`` package.

``pyautoattack`` on PyPI is the fra31/auto-attack code (import name ``pyautoattack``). Its
'standard' version runs APGD-CE, APGD-T, FAB-T and Square with 100 iterations / 5,000 queries;
weaker re-implementations (e.g. torchattacks' 10-step version) must not be reported as AutoAttack.
AutoAttack works on images in [0, 1], so the model is wrapped with its normalisation inside.
"""
import logging
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm_adv.attacks import PixelNormalizer
from timm_adv.utils import ProgressLog

__all__ = ['PixelSpaceModel', 'AUTOATTACK_VERSIONS', 'AUTOATTACK_ATTACKS', 'attack_iterations', 'attack_budgets',
           'collect_samples', 'evaluate_autoattack', 'import_autoattack']

_logger = logging.getLogger(__name__)

AUTOATTACK_VERSIONS = ('standard', 'rand', 'plus', 'custom')
AUTOATTACK_ATTACKS = ('apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square')
_NORMS = {'linf': 'Linf', 'l2': 'L2', 'l1': 'L1'}
INSTALL_HINT = "pip install 'timm-adv[eval]' (or: pip install pyautoattack)"


def import_autoattack():
    """The ``AutoAttack`` class of the official code; a clear error names the install otherwise."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ImportError(f'AutoAttack needs the official fra31 code, packaged as pyautoattack: {INSTALL_HINT}.') from None
    return AutoAttack


class PixelSpaceModel(nn.Module):
    """Wraps a model that takes normalised input so that it takes images in [0, 1].

    Args:
        model: Model expecting ``(x - mean) / std``.
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        amp_autocast: Autocast context factory the model runs under; logits are returned in fp32.
        channels_last: Feed the model channels-last input.

    Example:
        >>> pixel_model = PixelSpaceModel(model, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        >>> logits = pixel_model(images_in_0_1)
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 amp_autocast: Callable = nullcontext, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.normalizer = PixelNormalizer(mean, std)
        self.amp_autocast = amp_autocast
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalizer.from_pixel(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.amp_autocast():
            return self.model(x).float()

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input back to [0, 1] pixels."""
        return self.normalizer.to_pixel(x).clamp(0, 1)


def collect_samples(loader, num_samples: int, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_samples`` (input, target) pairs of a loader, concatenated (a fixed subset)."""
    inputs, targets, count = [], [], 0
    for input, target in loader:
        take = min(num_samples - count, input.shape[0])
        inputs.append(input[:take].to(device) if device is not None else input[:take])
        targets.append(target[:take].to(device) if device is not None else target[:take])
        count += take
        if count >= num_samples:
            break
    if not inputs:
        raise ValueError('The evaluation loader is empty; check --data-dir / --split.')
    return torch.cat(inputs), torch.cat(targets)


def evaluate_autoattack(
        model: nn.Module,
        loader,
        eps: float,
        mean: Sequence[float],
        std: Sequence[float],
        norm: str = 'linf',
        version: str = 'standard',
        attacks: Optional[List[str]] = None,
        num_samples: int = 1000,
        batch_size: int = 250,
        device: Optional[torch.device] = None,
        seed: int = 0,
        n_iter: Optional[int] = None,
        amp_autocast: Callable = nullcontext,
        channels_last: bool = False,
        progress_interval: Optional[float] = None,
) -> Dict:
    """Robust accuracy under official AutoAttack on a fixed subset (the first N samples of the loader).

    Args:
        model: Model taking normalised input (as the loader yields it); evaluated in eval mode.
        loader: Yields normalised ``(input, target)`` batches in a fixed order.
        eps: Radius in pixel units [0, 1], e.g. 8/255.
        mean: Normalisation mean of the loader.
        std: Normalisation std of the loader.
        norm: ``linf``, ``l2`` or ``l1``.
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square), ``rand`` (for randomised defences),
            ``plus``, or ``custom`` with ``attacks``.
        attacks: Attack subset for ``version='custom'``, e.g. ``['apgd-ce', 'apgd-t']``.
        num_samples: Size of the fixed subset.
        batch_size: AutoAttack batch size.
        device: Device of the model.
        seed: AutoAttack seed.
        n_iter: Iterations of APGD/FAB for ``custom`` runs only (quick checks); the presets keep the
            official 100.
        amp_autocast: Autocast context factory for the model's forward passes.
        channels_last: Feed the model channels-last input.
        progress_interval: Seconds between progress lines (default: 30; the running attack, the model calls
            made, and the time left if every attack used its whole budget: an upper bound, attacks stop on
            fooled samples).

    Returns:
        Dict with the settings, ``clean_top1`` and ``robust_top1`` on the subset (percent), the
        robust accuracy after each attack (``per_attack``), the iterations each attack ran as read
        from the attack objects (``iterations``; Square counts queries; ``n_iter`` is APGD's) and the
        package version.

    Example:
        >>> evaluate_autoattack(model, loader, eps=8 / 255, mean=mean, std=std, num_samples=1000)
        {'version': 'standard', 'robust_top1': 48.5, ...}
    """
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f'--autoattack must be one of {", ".join(AUTOATTACK_VERSIONS)}, got {version!r}.')
    if norm not in _NORMS:
        raise ValueError(f'AutoAttack norm must be one of {", ".join(_NORMS)}, got {norm!r}.')
    if version == 'custom':
        if not attacks:
            raise ValueError("--autoattack custom needs --aa-attacks, e.g. --aa-attacks apgd-ce apgd-t.")
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown:
            raise ValueError(f'--aa-attacks: unknown attack(s) {unknown}; choose from {", ".join(AUTOATTACK_ATTACKS)}.')
    elif attacks:
        raise ValueError(f"--aa-attacks only applies to --autoattack custom (the {version!r} preset fixes its attacks).")
    if n_iter is not None and version != 'custom':
        raise ValueError(f"The official {version!r} preset fixes 100 iterations; a reduced n_iter needs version='custom'.")
    if num_samples < 1:
        raise ValueError(f'--aa-samples must be >= 1, got {num_samples}.')
    AutoAttack = import_autoattack()
    import pyautoattack

    model.eval()
    pixel_model = PixelSpaceModel(model, mean, std, amp_autocast=amp_autocast, channels_last=channels_last)
    pixel_model = pixel_model.to(device if device is not None else 'cpu').eval()
    x, y = collect_samples(loader, num_samples, device)
    x = pixel_model.to_pixels(x.float())
    aa_device = device if device is not None else x.device
    kwargs = dict(eps=float(eps), norm=_NORMS[norm], version=version, seed=seed, device=aa_device)
    if version == 'custom':
        kwargs['attacks'] = list(attacks)
    adversary = AutoAttack(pixel_model, **kwargs)
    if n_iter is not None:
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = adversary.fab.n_iter = n_iter
    _logger.info(f'AutoAttack {version} ({", ".join(adversary.attacks_to_run)}), {norm} eps={eps:.4g}, '
                 f'{x.shape[0]} samples, pyautoattack {pyautoattack.__version__}')
    start = time.time()
    per_attack = _run_logged(adversary, x, y, batch_size, pixel_model, progress_interval)
    clean_top1 = 100.0 * per_attack.pop('clean')
    robust_top1 = 100.0 * per_attack.pop('final')
    iterations = attack_iterations(adversary)
    _logger.info(f'AutoAttack done in {time.time() - start:.1f}s: clean {clean_top1:.2f}%, robust {robust_top1:.2f}% '
                 f'(iterations {iterations})')
    return dict(
        version=version, attacks=list(adversary.attacks_to_run), norm=norm, eps=float(eps), samples=int(x.shape[0]),
        seed=seed, n_iter=adversary.apgd.n_iter, iterations=iterations, clean_top1=clean_top1, robust_top1=robust_top1,
        per_attack={k: 100.0 * float(v) for k, v in per_attack.items()},
        package=f'pyautoattack {pyautoattack.__version__}',
    )


def attack_iterations(adversary) -> Dict[str, int]:
    """Iterations each attack of an AutoAttack object is set to run, read from its attack objects.

    APGD and FAB count iterations per restart; Square counts queries.

    Example:
        >>> attack_iterations(AutoAttack(model, eps=8 / 255))
        {'apgd-ce': 100, 'apgd-t': 100, 'fab-t': 100, 'square': 5000}
    """
    objects = {'apgd-ce': adversary.apgd, 'apgd-dlr': adversary.apgd, 'apgd-t': adversary.apgd_targeted,
               'fab': adversary.fab, 'fab-t': adversary.fab, 'square': adversary.square}
    return {name: int(objects[name].n_queries if name == 'square' else objects[name].n_iter)
            for name in adversary.attacks_to_run}


def attack_budgets(adversary) -> Dict[str, int]:
    """Model calls per batch each attack of an AutoAttack object makes when no sample is fooled early.

    APGD calls the model once per iteration (plus its start) per restart and target class, FAB twice per
    iteration, Square once per query.

    Example:
        >>> attack_budgets(AutoAttack(model, eps=8 / 255))['apgd-t']
        909
    """
    apgd, apgd_t, fab, square = adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square
    apgd_calls = apgd.n_restarts * (apgd.n_iter + 1)
    calls = {'apgd-ce': apgd_calls, 'apgd-dlr': apgd_calls,
             'apgd-t': apgd_t.n_target_classes * apgd_t.n_restarts * (apgd_t.n_iter + 1),
             'fab': fab.n_restarts * 2 * fab.n_iter, 'fab-t': fab.n_target_classes * 2 * fab.n_iter,
             'square': square.n_restarts * square.n_queries}
    return {name: int(calls[name]) for name in adversary.attacks_to_run}


class _AccuracyRecorder(logging.Handler):
    """Reads the per-attack robust accuracies that AutoAttack reports through its logger, and counts the
    model calls for progress lines with an estimate of the time left."""

    def __init__(self, adversary, num_samples: int, batch_size: int, interval: Optional[float]):
        super().__init__(logging.DEBUG)
        self.accuracy: Dict[str, float] = {}
        self.budgets = attack_budgets(adversary)
        self.batches = -(-num_samples // batch_size)
        self.interval = interval
        self.progress: Optional[ProgressLog] = None  # from the first attack on (not the input checks)
        self.attack, self.finished = '', 0

    def on_forward(self, *_) -> None:
        if self.progress is not None:
            self.progress.update(detail=f'running {self.attack}')

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        _logger.info(f'[autoattack] {message}')
        if message.startswith('initial accuracy: '):
            self.accuracy['clean'] = float(message.split(': ')[1].rstrip('%')) / 100
            self.progress = ProgressLog(sum(self.budgets.values()) * self.batches, 'AutoAttack',
                                        unit='model calls of the budget', interval=self.interval, logger=_logger,
                                        left='left at most')
        elif message.startswith('running '):
            self.attack = message[len('running '):]
        elif message.startswith('robust accuracy after '):
            name = message[len('robust accuracy after '):].split(':')[0].lower()
            self.accuracy[name] = float(message.split(': ')[1].split('%')[0]) / 100
            # an attack that stopped early on fooled samples leaves its budget unused: count it as done
            self.finished += self.budgets.get(name, 0) * self.batches
            if self.progress is not None:
                self.progress.done = max(self.progress.done, self.finished)


def _run_logged(adversary, x: torch.Tensor, y: torch.Tensor, batch_size: int, pixel_model: nn.Module,
                progress_interval: Optional[float]) -> Dict[str, float]:
    """Runs the evaluation, relaying AutoAttack's progress lines and collecting its accuracies."""
    aa_logger = adversary.logger
    recorder = _AccuracyRecorder(adversary, x.shape[0], batch_size, progress_interval)
    old_level, old_propagate = aa_logger.level, aa_logger.propagate
    aa_logger.addHandler(recorder)
    aa_logger.setLevel(logging.DEBUG)
    aa_logger.propagate = False
    hook = pixel_model.register_forward_hook(recorder.on_forward)
    try:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        hook.remove()
        aa_logger.removeHandler(recorder)
        aa_logger.setLevel(old_level)
        aa_logger.propagate = old_propagate
    with torch.no_grad():
        final = float((adversary.get_logits(x_adv).argmax(1) == y).float().mean())
    accuracy = recorder.accuracy
    if 'clean' not in accuracy:
        with torch.no_grad():
            accuracy['clean'] = float((adversary.get_logits(x).argmax(1) == y).float().mean())
    accuracy['final'] = final
    return accuracy

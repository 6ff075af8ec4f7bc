"""Shared machinery of the label-free methods (``contrastive``, ``ssat``): a feature model judged by a kNN.

The trained model is a timm feature model (``num_classes=0``). Labels never reach the loss; only the
kNN classifier reads them, through a feature bank of the training split that the task embeds itself
(eval transform, fixed order) whenever the weights have changed since the last embedding: once per
epoch in practice. The task's eval model is that :class:`~timm_adv.models.KNNClassifier`, so the
training loop's per-epoch validation reports kNN top-1 (``top1``) and kNN top-1 under PGD through the
kNN under attack (``pgd_top1``: the per-sample worst case of PGD through the soft vote and the
kNN-guided attack, each also reported) without any change to the loop.

At ImageNet scale the bank is the memory: ``--adv-knn-bank-dtype float16`` halves it, searches and guide
selection run chunk by chunk, and under DDP each process embeds a shard of the split (gathered into
one preallocated bank). Each training image's own bank entry is left out of its neighbours while
training (``exclude_self``, found by the image's input key, not its drifting feature): with ``--no-aug``
an image's nearest neighbour is itself, whose label would otherwise decide the label-free reference class
of stage 2.
"""
import argparse
import logging
import time
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.utils import get_state_dict
from timm.utils.model import unwrap_model

from timm_adv.attacks import PixelNormalizer
from timm_adv.data import create_bank_loader
from timm_adv.layers import split_projection_head_state, strip_projection_head
from timm_adv.models import (BANK_DTYPES, KNN_BACKENDS, KNN_VOTES, FeatureBank, KNNClassifier, build_feature_bank,
                             check_knn_settings)
from .arg_types import ATTACK_FLAGS, bounded_type
from .base import AdversarialTask

__all__ = ['KNN_ARGS', 'KNN_DEFAULTS', 'KNN_FLAGS', 'RepresentationTask', 'add_knn_args', 'bank_loader_from_args',
           'check_label_free_args']

_logger = logging.getLogger(__name__)

#: Defaults of the kNN / InfoNCE flags (:func:`add_knn_args`), the task's ``__init__`` and :meth:`knn_kwargs`.
KNN_DEFAULTS = dict(adv_knn_k=75, adv_knn_temperature=0.07, adv_knn_backend='torch', adv_knn_vote='weighted',
                    adv_knn_bank_dtype='float32', adv_knn_bank_samples=None, adv_nce_temperature=0.2)
#: Parameters of the kNN settings (:func:`~timm_adv.models.check_knn_settings`) -> the flags that set them.
KNN_FLAGS = {'k': '--adv-knn-k', 'temperature': '--adv-knn-temperature', 'backend': '--adv-knn-backend',
             'vote': '--adv-knn-vote'}
#: Destinations of the kNN / InfoNCE flags that ``contrastive`` creates (:func:`add_knn_args`) and ``ssat`` reads too.
KNN_ARGS = tuple(KNN_DEFAULTS)


def add_knn_args(group: argparse._ArgumentGroup) -> None:
    """The kNN and InfoNCE flags shared by ``contrastive`` and ``ssat``."""
    d = KNN_DEFAULTS
    group.add_argument('--adv-knn-k', type=bounded_type('--adv-knn-k', int, 1), default=d['adv_knn_k'], metavar='K',
                       help='contrastive, ssat: neighbours of the kNN classifier (default: %(default)s)')
    group.add_argument('--adv-knn-temperature', type=float, default=d['adv_knn_temperature'], metavar='T',
                       help='contrastive, ssat: kNN vote weight exp(cos / T) (default: %(default)s)')
    group.add_argument('--adv-knn-backend', choices=KNN_BACKENDS, default=d['adv_knn_backend'],
                       help='contrastive, ssat: exact kNN search in torch or faiss-cpu (default: %(default)s)')
    group.add_argument('--adv-knn-vote', choices=KNN_VOTES, default=d['adv_knn_vote'],
                       help="contrastive, ssat: similarity-weighted vote exp(cos / T), differentiable (PGD can attack "
                            "it), or DkNN's unweighted count (default: %(default)s)")
    group.add_argument('--adv-knn-bank-dtype', choices=tuple(BANK_DTYPES), default=d['adv_knn_bank_dtype'],
                       help='contrastive, ssat: storage dtype of the feature bank; similarities stay float32 '
                            '(default: %(default)s; float16 halves an ImageNet bank)')
    group.add_argument('--adv-knn-bank-samples', type=bounded_type('--adv-knn-bank-samples', int, 1),
                       default=d['adv_knn_bank_samples'], metavar='N',
                       help='contrastive, ssat: bank of N evenly spaced training images (default: all)')
    group.add_argument('--adv-nce-temperature', type=float, default=d['adv_nce_temperature'], metavar='T',
                       help='contrastive, ssat: InfoNCE temperature (default: %(default)s)')


def bank_loader_from_args(args: argparse.Namespace, model: nn.Module, device: Optional[torch.device] = None):
    """A callable creating the training-split loader (eval transform, ``--adv-knn-bank-samples``) on first use."""
    data_config = resolve_data_config(vars(args), model=model)
    return lambda: create_bank_loader(
        args.dataset, args.data_dir, args.train_split, data_config,
        batch_size=getattr(args, 'validation_batch_size', None) or args.batch_size, workers=args.workers,
        device=device, num_samples=getattr(args, 'adv_knn_bank_samples', None),
        use_prefetcher=not getattr(args, 'no_prefetcher', False), class_map=getattr(args, 'class_map', ''),
        download=getattr(args, 'dataset_download', False))


def check_label_free_args(args: argparse.Namespace, method: str) -> None:
    """Refuses flags that only make sense with labels."""
    if getattr(args, 'mixup', 0) > 0 or getattr(args, 'cutmix', 0) > 0 or getattr(args, 'cutmix_minmax', None):
        raise ValueError(f'--mixup/--cutmix mix labels, but --adv-method {method} trains without labels: drop them.')


class RepresentationTask(AdversarialTask):
    """Base of the label-free methods: kNN eval model, bank refresh, feature-model checkpoints and export.

    Args:
        model: timm feature model (``num_classes=0``), possibly with a projection head.
        bank_loader: Loader over the labelled bank split (eval transform, fixed order), or a callable creating it
            on first use (exports that never embed a bank need no data).
        num_classes: Classes of the bank labels.
        attack: Training attack (stage 2) or None.
        mean: Input normalisation mean (pixel space conversions).
        std: Input normalisation std.
        knn_k: kNN neighbours.
        knn_temperature: kNN vote temperature.
        knn_backend: ``torch`` or ``faiss``.
        knn_vote: ``weighted`` or ``count``.
        bank_dtype: Storage dtype of the feature bank.
        nce_temperature: InfoNCE temperature.
        amp_autocast: Autocast context factory for the bank embedding (``--amp``).
    """

    default_bn_mode = 'eval'
    compile_note = ('the training forward is compiled; the kNN classifier (the per-epoch validation, the bank '
                    "refresh and ssat's kNN-guided attack) runs the eager backbone.")
    output_is_logits = False  # training output is features
    param_flags = {**ATTACK_FLAGS, **KNN_FLAGS}
    flag_defaults = KNN_DEFAULTS

    def __init__(
            self,
            model: nn.Module,
            bank_loader,
            num_classes: int,
            attack=None,
            mean=None,
            std=None,
            knn_k: int = KNN_DEFAULTS['adv_knn_k'],
            knn_temperature: float = KNN_DEFAULTS['adv_knn_temperature'],
            knn_backend: str = KNN_DEFAULTS['adv_knn_backend'],
            knn_vote: str = KNN_DEFAULTS['adv_knn_vote'],
            bank_dtype: torch.dtype = BANK_DTYPES[KNN_DEFAULTS['adv_knn_bank_dtype']],
            nce_temperature: float = KNN_DEFAULTS['adv_nce_temperature'],
            amp_autocast: Optional[Callable] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, None, attack=attack, device=device, dtype=dtype, verbose=verbose)
        if getattr(model, 'num_classes', 0) != 0:
            raise ValueError(f'{type(self).__name__} trains a feature model: create it with num_classes=0 '
                             f'(prepare_model does it).')
        if not nce_temperature > 0:
            raise ValueError(f'--adv-nce-temperature must be > 0, got {nce_temperature}.')
        if num_classes is None or num_classes < 2:
            raise ValueError(f'The kNN needs the class count of the bank labels (>= 2), got {num_classes} '
                             f'(--num-classes).')
        self._bank_loader = bank_loader
        self.num_classes = int(num_classes)
        self.normalizer = PixelNormalizer(mean, std)
        self.knn_k = int(knn_k)
        self.knn_temperature = float(knn_temperature)
        self.knn_backend = knn_backend
        self.knn_vote = knn_vote
        self.bank_dtype = bank_dtype
        self.amp_autocast = amp_autocast
        self.nce_temperature = float(nce_temperature)
        #: Training steps taken; a bank built at an older version is stale.
        self.weights_version = 0
        self.bank_refresh_seconds = []
        self._banks: Dict[bool, tuple] = {}
        self._knn: Dict[bool, KNNClassifier] = {}
        check_knn_settings(self.knn_k, self.knn_temperature, self.knn_backend, self.knn_vote)

    @classmethod
    def prepare_model(cls, model: nn.Module, args: Optional[argparse.Namespace] = None) -> nn.Module:
        """The feature model: the classifier head is removed (``reset_classifier(0)``)."""
        model.reset_classifier(0)
        return model

    @classmethod
    def knn_kwargs(cls, args: argparse.Namespace, device: Optional[torch.device] = None) -> Dict[str, Any]:
        autocast = None
        if getattr(args, 'amp', False):  # the bank is embedded under --amp like the training forward
            device_type = torch.device(device).type if device is not None else 'cpu'
            dtype = torch.bfloat16 if getattr(args, 'amp_dtype', None) == 'bfloat16' or device_type == 'cpu' \
                else torch.float16
            autocast = partial(torch.autocast, device_type=device_type, dtype=dtype)
        return dict(knn_k=cls.setting(args, 'adv_knn_k'), knn_temperature=cls.setting(args, 'adv_knn_temperature'),
                    knn_backend=cls.setting(args, 'adv_knn_backend'), knn_vote=cls.setting(args, 'adv_knn_vote'),
                    bank_dtype=BANK_DTYPES[cls.setting(args, 'adv_knn_bank_dtype')],
                    nce_temperature=cls.setting(args, 'adv_nce_temperature'), amp_autocast=autocast)

    @property
    def bank_loader(self):
        if callable(self._bank_loader) and not hasattr(self._bank_loader, '__iter__'):
            self._bank_loader = self._bank_loader()
        return self._bank_loader

    def backbone(self, ema: bool = False) -> Optional[nn.Module]:
        """The feature model (or its EMA copy) without DDP / EMA wrappers."""
        module = self.get_trainable_module(ema=ema)
        return None if module is None else unwrap_model(module)

    def feature_bank(self, ema: bool = False) -> FeatureBank:
        """The bank of the current weights, re-embedded only when they changed since the last embedding."""
        cached = self._banks.get(ema)
        if cached is not None and cached[0] == self.weights_version:
            return cached[1]
        start = time.time()
        bank = build_feature_bank(self.backbone(ema), self.bank_loader, self.num_classes, device=self.device,
                                  amp_autocast=self.amp_autocast, dtype=self.bank_dtype)
        self.bank_refresh_seconds.append(time.time() - start)
        if len(bank) < self.knn_k:
            raise ValueError(f'--adv-knn-k {self.knn_k} is larger than the bank ({len(bank)} images); lower it or '
                             f'raise --adv-knn-bank-samples.')
        self._banks[ema] = (self.weights_version, bank)
        if self.verbose:
            _logger.info(f'kNN bank{" (EMA)" if ema else ""}: {len(bank)} x {bank.dim} {self.bank_dtype} features '
                         f'({bank.nbytes / 2 ** 20:.1f} MiB) embedded in {self.bank_refresh_seconds[-1]:.1f}s')
        return bank

    def knn_classifier(self, ema: bool = False, bank: Optional[FeatureBank] = None) -> KNNClassifier:
        """The kNN classifier over the (lazily refreshed) bank; over ``bank`` when given, for training images,
        whose own bank entry is excluded from their neighbours."""
        if bank is not None:
            return KNNClassifier(self.backbone(ema), bank, self.knn_k, self.knn_temperature, self.knn_backend,
                                 self.knn_vote, exclude_self=True)
        if ema not in self._knn:
            self._knn[ema] = KNNClassifier(self.backbone(ema), lambda: self.feature_bank(ema), self.knn_k,
                                           self.knn_temperature, self.knn_backend, self.knn_vote)
        return self._knn[ema]

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The kNN classifier: the loop's per-epoch validation measures kNN top-1 (clean and under PGD)."""
        if module is not None or self.get_trainable_module(ema=ema) is None:
            return module
        return self.knn_classifier(ema)

    def after_step(self) -> None:
        """Marks the weights as changed (called by ``forward``: the loop steps the optimiser after it)."""
        self.weights_version += 1

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn: Callable = unwrap_model) -> Dict[str, Any]:
        """``state_dict``: the plain feature model; ``task_state``: the projection head, if any."""
        module = self.get_trainable_module(ema=ema)
        if module is None:
            return {}
        plain, head = split_projection_head_state(get_state_dict(module, unwrap_fn))
        state: Dict[str, Any] = {'state_dict_ema' if ema else 'state_dict': plain}
        if head:
            state['task_state_ema' if ema else 'task_state'] = {'projection_head': head}
        return state

    def load_checkpoint_state(self, state_dict: Dict[str, Any], task_state: Optional[Dict[str, Any]] = None,
                              ema: bool = False, strict: bool = True) -> None:
        module = self.get_trainable_module(ema=ema)
        if module is None:
            raise RuntimeError('Cannot load EMA checkpoint state before setup_ema().')
        unwrap_model(module).load_state_dict({**state_dict, **(task_state or {}).get('projection_head', {})},
                                             strict=strict)
        self.after_step()

    def export_model(self) -> nn.Module:
        """The plain timm feature model (``num_classes=0``), projection head removed."""
        return strip_projection_head(self.unwrapped_model)

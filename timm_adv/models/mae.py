"""Fine-tuning from MAE pre-training checkpoints (He et al., CVPR 2022).

Two sources hold MAE encoders: timm's ``.mae`` tags (``vit_base_patch16_224.mae``,
``vit_large_patch16_224.mae``, ``vit_huge_patch14_224.mae``) and the original release files
(``mae_pretrain_vit_base.pth`` and the pre-training checkpoints): ``{'model': state_dict}`` with
timm's ViT key names, sometimes with the decoder (``decoder_*``) and the ``mask_token``.

Loading does what MAE's ``main_finetune.py`` does, with timm's pieces: the decoder and mask
token are dropped, timm's ViT ``checkpoint_filter_fn`` resamples the position embedding (and the
patch embedding) to the model's grid, the classifier head and ``fc_norm`` stay new, and the head
weight is re-drawn from a truncated normal with std 2e-5. Every remaining tensor must fit the
model: a checkpoint of another ViT size fails with both shapes named.
"""
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.layers import trunc_normal_
from timm.models import VisionTransformer, load_pretrained, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn

from timm_adv.utils import CheckpointError, read_checkpoint

__all__ = ['MAE_HEAD_INIT_STD', 'MAEWeights', 'MAELoadReport', 'is_mae_checkpoint', 'is_mae_tag',
           'resolve_mae_weights', 'mae_checkpoint_filter_fn', 'load_mae_weights', 'warn_mae_normalisation']

_logger = logging.getLogger(__name__)

#: std of the truncated normal MAE's fine-tuning draws the new head weight from.
MAE_HEAD_INIT_STD = 2e-5

_PRETRAIN_ONLY = ('decoder_', 'mask_token')  # MAE pre-training parts that fine-tuning drops
_NEW_MODULES = ('head.', 'fc_norm.')         # created fresh for fine-tuning


class MAEWeights(NamedTuple):
    """Where MAE weights come from: the flag that named them, the path or model name, and the
    state dict already read from a file (None for a timm ``.mae`` tag, fetched by timm)."""
    flag: str
    source: str
    state_dict: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class MAELoadReport:
    """What :func:`load_mae_weights` loaded, dropped and created."""
    loaded: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)
    pos_embed: str = ''

    def summary(self, weights: MAEWeights, model_name: str) -> str:
        """The one log line describing the load."""
        decoder = sum(k.startswith('decoder_') for k in self.dropped)
        others = [k for k in self.dropped if not k.startswith('decoder_')]
        dropped = ([f'{decoder} decoder tensors'] if decoder else []) + others
        new_modules = sorted({k.rsplit('.', 1)[0] for k in self.new})
        return (f'MAE weights {weights.source!r} ({weights.flag}) -> {model_name}: loaded {len(self.loaded)} encoder '
                f'tensors{self.pos_embed}; dropped {", ".join(dropped) or "nothing"}; new: '
                f'{", ".join(new_modules) or "nothing"} (head weight trunc-normal std {MAE_HEAD_INIT_STD:g}).')


def is_mae_checkpoint(checkpoint: Any) -> bool:
    """True for an original MAE pre-training file: ``{'model': ViT encoder (+ decoder)}`` without a head.

    Fine-tuned MAE files carry a classifier head and load as ordinary timm ViT checkpoints.

    Example:
        >>> is_mae_checkpoint(torch.load('mae_pretrain_vit_base.pth', weights_only=True))
        True
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get('model'), Mapping):
        return False
    state_dict = checkpoint['model']
    return 'patch_embed.proj.weight' in state_dict and 'cls_token' in state_dict and 'head.weight' not in state_dict


def is_mae_tag(model_name: str) -> bool:
    """True for timm's MAE encoder tags on ViTs, by name or on the Hub.

    Example:
        >>> is_mae_tag('vit_base_patch16_224.mae'), is_mae_tag('hf-hub:timm/vit_base_patch16_224.mae')
        (True, True)
    """
    if model_name.startswith('hf-hub:timm/'):  # timm's own Hub copies of its tags
        model_name = model_name[len('hf-hub:timm/'):]
    arch, tag = split_model_name_tag(model_name)
    return arch.startswith('vit_') and tag == 'mae'


def resolve_mae_weights(model_name: str, pretrained: bool = False, pretrained_path: Optional[str] = None,
                        initial_checkpoint: Optional[str] = None) -> Optional[MAEWeights]:
    """Finds MAE weights among train.py's loading flags, reading (and so checking) the files once.

    An MAE ``--initial-checkpoint`` is the MAE weights; otherwise an MAE ``--pretrained-path``, else a
    ``.mae`` tag (``hf-hub:timm/`` too) with ``--pretrained``. As in timm, where the initial checkpoint
    is loaded last, the caller loads these first and an ordinary ``--initial-checkpoint`` over them
    (whole: encoder, ``fc_norm`` and head). Returns None when no MAE weights are named: the caller
    loads as timm does.

    Raises:
        CheckpointError: A named file is missing or unreadable.

    Example:
        >>> weights = resolve_mae_weights('vit_base_patch16_224', pretrained=True,
        ...                               pretrained_path='mae_pretrain_vit_base.pth')
    """
    for flag, path in (('--initial-checkpoint', initial_checkpoint), ('--pretrained-path', pretrained_path)):
        if not path:
            continue
        checkpoint = read_checkpoint(path, flag)
        if is_mae_checkpoint(checkpoint):
            return MAEWeights(flag, path, dict(checkpoint['model']))
    if pretrained and not pretrained_path and is_mae_tag(model_name):
        return MAEWeights('--pretrained', model_name)
    return None


def _shape(t: torch.Tensor) -> str:
    return 'x'.join(str(s) for s in t.shape)


def mae_checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: VisionTransformer,
                             report: Optional[MAELoadReport] = None) -> Dict[str, torch.Tensor]:
    """timm ``filter_fn`` for MAE encoder state dicts; checks that every kept tensor fits ``model``.

    Drops the decoder, the mask token (which would also send timm's filter down its DINOv2 path),
    any classifier and ``fc_norm``, and ``norm`` when the model pools through ``fc_norm``
    (``--gp avg``, MAE's fine-tuning). timm's ViT filter then resamples the position embedding.

    Raises:
        CheckpointError: A tensor's shape differs from the model's (another ViT size), or encoder
            tensors are missing or left over.
    """
    report = report if report is not None else MAELoadReport()
    expected = model.state_dict()
    kept = {}
    for k, v in state_dict.items():
        pooled_norm = k.startswith('norm.') and k not in expected
        if k.startswith(_PRETRAIN_ONLY + _NEW_MODULES) or pooled_norm:
            report.dropped.append(k)
        else:
            kept[k] = v
    out = checkpoint_filter_fn(kept, model)
    if 'pos_embed' in kept and kept['pos_embed'].shape != out['pos_embed'].shape:
        prefix = model.num_prefix_tokens if not model.no_embed_class else 0
        old, new = kept['pos_embed'].shape[1] - prefix, out['pos_embed'].shape[1] - prefix
        report.pos_embed = f' (pos_embed resampled from {old} to {new} patches)'

    mismatched = [k for k in out if k in expected and out[k].shape != expected[k].shape]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f'MAE checkpoint does not fit {type(model).__name__} of width {model.embed_dim} and depth '
            f'{len(model.blocks)}: {k} is {_shape(out[k])} in the checkpoint but {_shape(expected[k])} in the '
            f'model ({len(mismatched)} tensors differ). It was saved for another ViT size; pick the matching '
            f'--model (MAE ViT-B/16: vit_base_patch16_224, ViT-L/16: vit_large_patch16_224, ViT-H/14: '
            f'vit_huge_patch14_224).')
    unexpected = [k for k in out if k not in expected]
    missing = [k for k in expected if k not in out and not k.startswith(_NEW_MODULES)]
    if unexpected or missing:
        detail = [f'{len(x)} {what} (e.g. {x[0]})' for x, what in ((missing, 'encoder tensors missing'),
                                                                   (unexpected, 'tensors not in the model')) if x]
        raise CheckpointError(f'MAE checkpoint does not fit this ViT: {"; ".join(detail)}. Pick the --model the '
                              f'encoder was pre-trained as (same depth, patch size and class token).')
    report.loaded = list(out)
    report.new = [k for k in expected if k not in out]
    return out


def load_mae_weights(model: VisionTransformer, weights: MAEWeights, model_name: str = '') -> MAELoadReport:
    """Loads MAE encoder weights into a freshly created timm ViT for fine-tuning.

    The head and ``fc_norm`` stay new; the head weight is drawn from a truncated normal with std
    :data:`MAE_HEAD_INIT_STD` and its bias is zero, as MAE's fine-tuning does. Logs one line
    naming what was loaded, dropped and created.

    Args:
        model: A timm ``VisionTransformer`` (e.g. ``--gp avg`` for MAE's pooled ``fc_norm`` head).
        weights: From :func:`resolve_mae_weights`.
        model_name: Name for the log line.

    Raises:
        CheckpointError: ``model`` is not a ViT, or the checkpoint does not fit it.

    Example:
        >>> model = timm.create_model('vit_base_patch16_224', num_classes=1000, global_pool='avg')
        >>> load_mae_weights(model, MAEWeights('--pretrained-path', 'mae_pretrain_vit_base.pth', state_dict))
    """
    model_name = model_name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f'{weights.flag} {weights.source!r}: MAE weights are ViT encoders, but --model '
                              f'{model_name!r} is not a timm VisionTransformer; use e.g. vit_base_patch16_224.')
    report = MAELoadReport()
    cfg = dict(model.pretrained_cfg)
    if weights.state_dict is not None:
        cfg.update(source='', state_dict=weights.state_dict, num_classes=0)  # the file already read, no download
    try:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes,
                        in_chans=model.patch_embed.proj.in_channels,
                        filter_fn=lambda sd, m: mae_checkpoint_filter_fn(sd, m, report), strict=False)
    except CheckpointError as e:
        raise CheckpointError(f'{weights.flag} {weights.source!r}: {e}') from None
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            trunc_normal_(head.weight, std=MAE_HEAD_INIT_STD)
            nn.init.zeros_(head.bias)
    _logger.info(report.summary(weights, model_name))
    return report


def warn_mae_normalisation(weights: Optional[MAEWeights], mean, model_name: str = '') -> bool:
    """Warns when an MAE release file is fine-tuned on inputs normalised unlike its pre-training.

    The released encoders saw ImageNet mean/std; timm's ``.mae`` tags carry it in their
    ``pretrained_cfg``, a bare architecture name may not (``vit_base_patch16_224`` uses 0.5).

    Returns:
        True if it warned.
    """
    if weights is None or weights.state_dict is None or tuple(mean) == tuple(IMAGENET_DEFAULT_MEAN):
        return False
    _logger.warning(f'{weights.flag} {weights.source!r}: the released MAE encoders were pre-trained on inputs '
                    f'normalised with ImageNet mean/std, but this run normalises with mean {tuple(mean)}. For those '
                    f'files use the .mae tag as --model (e.g. vit_base_patch16_224.mae) or pass --mean/--std.')
    return True

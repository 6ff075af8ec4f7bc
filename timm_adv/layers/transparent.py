"""State-dict hooks that let a wrapper module store its wrapped child at the wrapper's own keys.

A wrapper such as ``DualBatchNorm2d`` (``main_bn``) or ``AdvBN`` (``module``) adds one level to the
module tree; with these hooks its state dict still reads like the unwrapped model's (``layer1.0.conv1.weight``,
not ``layer1.module.0.conv1.weight``), so checkpoints load into the plain timm architecture and back.
"""
from functools import partial
from typing import Dict, Sequence

import torch.nn as nn

__all__ = ['register_transparent_child']


def _save_child_at_own_keys(child: str, module: nn.Module, state_dict: Dict, prefix: str, local_metadata) -> None:
    # the subtree of this module was written last, so its keys are the tail of ``state_dict``
    child_prefix = f'{prefix}{child}.'
    own = [k for k in state_dict if k.startswith(prefix)]
    entries = [(k, state_dict.pop(k)) for k in own]
    for k, v in entries:
        if k.startswith(child_prefix):
            state_dict[prefix + k[len(child_prefix):]] = v
    for k, v in entries:
        if not k.startswith(child_prefix):
            state_dict[k] = v
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        # layers such as BN read their version from the metadata at their own key when loading
        for key in [k for k in metadata if k == prefix + child or k.startswith(child_prefix)]:
            metadata[prefix + key[len(child_prefix):] if key != prefix + child else prefix[:-1]] = metadata.pop(key)


def _load_child_from_own_keys(child: str, apart: Sequence[str], module: nn.Module, state_dict: Dict, prefix: str,
                              local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    apart_prefixes = tuple(f'{prefix}{name}.' for name in apart)
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(apart_prefixes)]:
        state_dict[f'{prefix}{child}.{k[len(prefix):]}'] = state_dict.pop(k)


def register_transparent_child(module: nn.Module, child: str, apart: Sequence[str] = ()) -> None:
    """Makes ``module.<child>`` save and load its entries at ``module``'s own keys.

    Args:
        module: The wrapper.
        child: Name of the wrapped child whose keys lose the ``<child>.`` level.
        apart: Other children of the wrapper that keep their own key level (e.g. ``aux_bn``).

    Example:
        >>> class Wrap(nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.inner = inner
        ...         register_transparent_child(self, 'inner')
        >>> list(Wrap(nn.Linear(2, 2)).state_dict())
        ['weight', 'bias']
    """
    module.register_state_dict_post_hook(partial(_save_child_at_own_keys, child))
    module.register_load_state_dict_pre_hook(partial(_load_child_from_own_keys, child, tuple(apart)))

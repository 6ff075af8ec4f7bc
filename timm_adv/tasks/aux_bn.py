"""Checkpoint and export handling shared by tasks that train auxiliary BatchNorms.

AdvProp (and DAT with ``--adv-dat-aux-bn``) train a model whose BNs are :class:`DualBatchNorm2d`.
Checkpoints keep the plain timm model under ``state_dict`` (so ``model_best.pth.tar`` loads strictly
into ``timm.create_model``) and the auxiliary BNs under ``task_state['aux_bn']`` (timm's
``*.aux_bn.0.*`` keys), so ``--resume`` restores them; export drops them. A model without dual BNs
passes through unchanged, so a task can use this whether or not it converted its model.
"""
import copy
from typing import Any, Dict, Optional

import torch.nn as nn
from timm.utils.model import unwrap_model

from timm_adv.layers import aux_bn_state_dict, dual_bn_layers, strip_aux_bn

__all__ = ['AuxBNCheckpointMixin']


class AuxBNCheckpointMixin:
    """Mixin for :class:`~timm_adv.tasks.AdversarialTask` subclasses whose model may hold auxiliary BNs.

    Example:
        >>> class MyTask(AuxBNCheckpointMixin, AdversarialTask):
        ...     ...
        >>> task.get_checkpoint_state()['state_dict']  # plain timm keys; aux BNs in task_state['aux_bn']
    """

    #: How to produce a checkpoint with auxiliary BN state, named in the error of a strict load.
    aux_bn_source: str = '--adv-method advprop'

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The auxiliary BNs (timm key layout, ``*.aux_bn.0.*``), kept out of the plain ``state_dict``."""
        model = self.get_eval_model(module, ema=ema)
        if model is None or not dual_bn_layers(unwrap_model(model)):
            return {}
        return {'aux_bn': aux_bn_state_dict(unwrap_model(model))}

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=unwrap_model) -> Dict[str, Any]:
        """``state_dict`` holds the plain timm model, ``task_state['aux_bn']`` the auxiliary BNs."""
        state = super().get_checkpoint_state(ema=ema, unwrap_fn=unwrap_fn)
        key = 'state_dict_ema' if ema else 'state_dict'
        if key in state:
            state[key] = strip_aux_bn(state[key])
        return state

    def load_checkpoint_state(
            self,
            state_dict: Dict[str, Any],
            task_state: Optional[Dict[str, Any]] = None,
            ema: bool = False,
            strict: bool = True,
    ) -> None:
        """Restores the plain weights and, from ``task_state``, the auxiliary BNs."""
        model = self.get_eval_model(ema=ema)
        if model is None:
            raise RuntimeError('Cannot load EMA checkpoint state before setup_ema().')
        aux = (task_state or {}).get('aux_bn', {})
        has_dual = bool(dual_bn_layers(unwrap_model(model)))
        if strict and has_dual and not aux and not aux_bn_state_dict(state_dict):
            raise ValueError(
                f'--resume: the checkpoint has no auxiliary BN state (task_state["aux_bn"]), so it was not written by '
                f'an {self.aux_bn_source} run. To start from plain weights, pass them with --initial-checkpoint (the '
                f'auxiliary BNs start as copies of the main BNs).')
        unwrap_model(model).load_state_dict({**state_dict, **aux}, strict=strict)
        self.load_task_state(task_state, strict=strict, ema=ema)

    def export_model(self) -> nn.Module:
        """The trained model without auxiliary BNs: the original timm architecture (a copy if it had any)."""
        model = self.unwrapped_model
        return strip_aux_bn(copy.deepcopy(model)) if dual_bn_layers(model) else model

"""Checkpoint layout of the methods with auxiliary BNs (AdvProp, AdvBN).

``state_dict`` holds the plain timm model (main BNs), so ``model_best.pth.tar`` loads strictly into
``timm.create_model``; the auxiliary BNs travel in ``task_state['aux_bn']`` (timm's ``*.aux_bn.0.*``
keys), so ``--resume`` restores them.
"""
from typing import Any, Dict, Optional

import torch.nn as nn
from timm.utils.model import unwrap_model

from timm_adv.layers import aux_bn_state_dict, dual_bn_layers, strip_aux_bn

__all__ = ['AuxBNStateMixin']


class AuxBNStateMixin:
    """Task mix-in: plain ``state_dict`` in checkpoints, auxiliary BNs in ``task_state['aux_bn']``."""

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The auxiliary BNs (timm key layout, ``*.aux_bn.0.*``), kept out of the plain ``state_dict``."""
        model = self.get_eval_model(module, ema=ema)
        return {} if model is None else {'aux_bn': aux_bn_state_dict(unwrap_model(model))}

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
        model = unwrap_model(model)
        aux = (task_state or {}).get('aux_bn', {})
        if strict and dual_bn_layers(model) and not aux and not aux_bn_state_dict(state_dict):
            raise ValueError(
                f'--resume: the checkpoint has no auxiliary BN state (task_state["aux_bn"]), so it was not written by '
                f'an --adv-method {self.method_name} run. To start {self.method_name} from plain weights, pass them '
                f'with --initial-checkpoint (the auxiliary BNs start as copies of the main BNs).')
        model.load_state_dict({**state_dict, **aux}, strict=strict)

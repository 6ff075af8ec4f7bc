"""The projection head of contrastive pre-training, attached to a timm feature model and stripped at export.

The head sits on the timm model as the submodule ``projection_head`` so that the optimiser, EMA and
checkpoint code see its parameters without any change to the training loop; the model's own
``forward`` never calls it. Checkpoints keep it in ``task_state`` and exports drop it, leaving the
plain timm architecture.
"""
import copy
from typing import Dict

import torch
import torch.nn as nn

__all__ = ['PROJECTION_HEAD_KEY', 'ProjectionHead', 'insert_projection_head', 'strip_projection_head',
           'split_projection_head_state']

PROJECTION_HEAD_KEY = 'projection_head'


class ProjectionHead(nn.Module):
    """SimCLR's MLP head: Linear, ReLU, Linear (``in_features -> hidden -> out_features``).

    Example:
        >>> head = ProjectionHead(512, 512, 128)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(self, in_features: int, hidden_features: int = 512, out_features: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def insert_projection_head(model: nn.Module, hidden_features: int = 512, out_features: int = 128) -> nn.Module:
    """Turns ``model`` into a feature model (``reset_classifier(0)``) and attaches a projection head.

    Example:
        >>> model = insert_projection_head(timm.create_model('resnet10t'))
        >>> z = model.projection_head(model(x))
    """
    model.reset_classifier(0)
    setattr(model, PROJECTION_HEAD_KEY, ProjectionHead(model.num_features, hidden_features, out_features))
    return model


def strip_projection_head(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without its projection head: the plain timm feature model."""
    plain = copy.deepcopy(model)
    if hasattr(plain, PROJECTION_HEAD_KEY):
        delattr(plain, PROJECTION_HEAD_KEY)
    return plain


def split_projection_head_state(state_dict: Dict[str, torch.Tensor]):
    """``(plain state dict, projection head state dict)`` of a model's state dict."""
    prefix = PROJECTION_HEAD_KEY + '.'
    plain = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    head = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    return plain, head

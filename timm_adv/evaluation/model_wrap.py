"""Evaluation-model wrappers of timm's validate.py: TorchScript, torch.compile, AOT autograd, DataParallel."""
import logging
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['DtypeModel', 'wrap_eval_model']

_logger = logging.getLogger(__name__)


def wrap_eval_model(
        model: nn.Module,
        torchscript: bool = False,
        torchcompile: Optional[str] = None,
        torchcompile_mode: Optional[str] = None,
        aot_autograd: bool = False,
        num_gpu: int = 1,
) -> nn.Module:
    """Scripts or compiles an eval model (at most one of them), then spreads it over ``num_gpu`` GPUs.

    Every wrapper keeps input gradients, so the attacks (``autograd.grad`` on the input) run through it.

    Args:
        model: The model, already on its device and dtype.
        torchscript: ``torch.jit.script`` it (create it with ``scriptable=True``).
        torchcompile: ``torch.compile`` backend (``inductor``, ``aot_eager``, ...), or None.
        torchcompile_mode: ``torch.compile`` mode (``max-autotune``, ...).
        aot_autograd: functorch's ``memory_efficient_fusion``.
        num_gpu: ``nn.DataParallel`` over this many CUDA devices when above 1.

    Example:
        >>> model = wrap_eval_model(model, torchcompile='inductor')
    """
    if sum((torchscript, bool(torchcompile), aot_autograd)) > 1:
        raise ValueError('--torchscript, --torchcompile and --aot-autograd are exclusive; pick one.')
    if torchscript:
        model = torch.jit.script(model)
    elif torchcompile:
        torch._dynamo.reset()  # a bulk run compiles model after model; drop the previous graphs
        model = torch.compile(model, backend=torchcompile, mode=torchcompile_mode)
    elif aot_autograd:
        from functorch.compile import memory_efficient_fusion
        model = memory_efficient_fusion(model)
    if num_gpu > 1:
        if torch.cuda.device_count() < num_gpu:
            raise ValueError(f'--num-gpu {num_gpu}: only {torch.cuda.device_count()} CUDA devices are visible.')
        model = nn.DataParallel(model, device_ids=list(range(num_gpu)))
    return model


class DtypeModel(nn.Module):
    """Runs a model in another dtype (timm's ``--model-dtype``) behind float32 inputs and outputs.

    Every evaluation (attacks, AutoAttack, corruptions) feeds float32 pixels and reads float32 logits;
    the cast sits inside the model, so input gradients still reach the float32 input.

    Example:
        >>> model = DtypeModel(model.to(torch.bfloat16), torch.bfloat16)
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()

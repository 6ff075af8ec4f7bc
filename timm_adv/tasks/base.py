"""The base class every adversarial training method derives from.

A method is a ``timm.task.ClassificationTask`` that owns its attack. The training loop only calls
``task(input, target)``, backpropagates ``result['loss']`` and averages the other scalar entries as
metrics, so methods plug in without touching the loop. Hooks, all optional:

* :meth:`check_args` (classmethod): reject bad or misplaced flags at parse time, before any work.
* :meth:`prepare_model` (classmethod): convert the model before the optimiser, EMA and DDP exist
  (dual-BN conversion, layer insertion).
* :meth:`from_args`: build the task and its attack from parsed ``--adv-*`` flags.
* ``get_task_state`` / ``load_task_state`` (timm): extra state such as a generator and its optimiser,
  saved in ``task_state`` of every checkpoint and restored on ``--resume``.
* :meth:`on_epoch_start`: per-epoch bookkeeping.
* :meth:`export_model`: the plain timm model to evaluate and publish (training-only parts stripped).
* :meth:`card_details`: rows the model card adds about those parts (e.g. DAT's VQGAN); the card's method
  row and citation come from the class's :attr:`~AdversarialTask.paper`, ``url`` and ``citation``.
* :meth:`compile` (timm's hook, ``--torchcompile``): compiles the trained model once; attacks reach it
  through :attr:`attack_model`. A method with parts that stay eager says so in :attr:`compile_note`.
"""
import argparse
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.task import ClassificationTask
from timm.utils.model import unwrap_model

from timm_adv.attacks import PGDAttack, create_attack, hard_labels, parse_eps, unwrap_ddp
from .arg_types import ATTACK_FLAGS

__all__ = ['ATTACK_ARGS', 'AdversarialTask', 'top1']

_logger = logging.getLogger(__name__)

#: Destinations of the common attack flags (``--adv-eps`` ... ``--adv-bn-mode``); each method lists
#: the ones it reads in :attr:`AdversarialTask.uses_args`, and typing any other one is an error.
ATTACK_ARGS = ('adv_eps', 'adv_steps', 'adv_step_size', 'adv_norm', 'adv_random_start', 'adv_targeted',
               'adv_bn_mode')


def top1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent; soft targets count their arg-max class."""
    return (logits.detach().argmax(dim=1) == hard_labels(target)).float().mean() * 100.0


class AdversarialTask(ClassificationTask):
    """Classification task with an attack. Subclasses implement :meth:`forward`.

    Args:
        model: The model to train (already converted by :meth:`prepare_model`).
        criterion: Training loss, e.g. timm's ``SoftTargetCrossEntropy`` under mixup.
        attack: The attack used to make training examples, or None.
        device: Device for task tensors.
        verbose: Log the task set-up.
    """

    method_name: str = ''
    #: The method's paper (title, authors, venue), its address and its BibTeX entry, quoted by the model card;
    #: empty where there is no paper to cite.
    paper: str = ''
    url: str = ''
    citation: str = ''
    #: Flags this method reads besides the ones its own :meth:`add_args` creates: common attack flags
    #: (:data:`ATTACK_ARGS`) or another method's flags. ``check_adv_args`` rejects the rest.
    uses_args: Tuple[str, ...] = ATTACK_ARGS
    #: For a common flag the method does not read, the method's own flag that takes its place (named in the error).
    arg_hints: Dict[str, str] = {}
    #: Restore task-owned optimiser state (e.g. a generator's Adam) on resume; ``--no-resume-opt`` clears it.
    resume_optimizer_state: bool = True
    #: BN behaviour of the training attack when ``--adv-bn-mode`` is not given.
    default_bn_mode: str = 'train'
    #: Attack settings used when the matching ``--adv-*`` flag is not given; a callable is applied to eps.
    attack_defaults: Dict[str, Any] = dict(eps=8 / 255, steps=10, norm='linf', random_start=True)
    #: What ``--torchcompile`` leaves eager in this method (logged as a warning by :meth:`compile`), or ''.
    compile_note: str = ''
    #: ``result['output']`` holds class logits (a distillation teacher's logits are matched against them).
    output_is_logits: bool = True
    #: The catastrophic-overfitting guard is on when ``--adv-co-guard`` is not given (single-step methods).
    co_guard_default: bool = False
    #: Defaults of the method's own flags, ``{dest: default}``, the one place they are written: :meth:`add_args`
    #: declares the flags with them, :meth:`setting` falls back to them and ``__init__`` takes its defaults from
    #: the same table.
    flag_defaults: Dict[str, Any] = {}
    #: Parameters of the parts :meth:`from_args` builds (its attack, ...) -> the flags that set them: a
    #: :class:`~timm_adv.utils.ParameterError` they raise is re-raised naming the flag (``create_task``).
    param_flags: Dict[str, str] = ATTACK_FLAGS

    def __init__(
            self,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            attack: Optional[PGDAttack] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion, device=device, dtype=dtype, verbose=verbose)
        self.attack = attack

    @property
    def unwrapped_model(self) -> nn.Module:
        """The trained model itself, without DDP or ``torch.compile`` wrappers (export, state, layer lookup)."""
        return unwrap_model(self.trainable_module)

    @property
    def attack_model(self) -> nn.Module:
        """The module attacks run through: the compiled model after :meth:`compile`, never the DDP wrapper."""
        return unwrap_ddp(self.trainable_module)

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compiles the trained model (timm's hook, called by ``--torchcompile`` before DDP wrapping).

        Attacks (through :attr:`attack_model`), the training forward and validation all call the one
        compiled module: dynamo keeps a graph per BN mode / route, grad mode and frozen-or-trained
        parameters it meets (each compiled once, then reused every step), and ``torch.autograd.grad``
        w.r.t. the input runs the attack graph's compiled backward.

        Example:
            >>> task = create_task(model, criterion, args)
            >>> task.compile(backend='inductor')   # then task.prepare_distributed(...) under DDP
        """
        if self.compile_note:
            _logger.warning(f'--torchcompile with --adv-method {self.method_name}: {self.compile_note}')
        return super().compile(backend=backend, mode=mode, **compile_kwargs)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        """Adds this method's own flags (``--adv-<method>-*``) to the parser, with :attr:`flag_defaults`."""

    @classmethod
    def setting(cls, args: argparse.Namespace, dest: str) -> Any:
        """The value of one of the method's flags: ``args.<dest>``, or its :attr:`flag_defaults` entry when the
        namespace lacks it or holds None (namespaces built without the method's flags).

        Example:
            >>> FGSMSDITask.setting(argparse.Namespace(), 'adv_sdi_every')
            20
        """
        value = getattr(args, dest, None)
        return cls.flag_defaults[dest] if value is None else value

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Raises ValueError naming the flag on bad settings of this method's own flags.

        Called for the chosen method only: flags of other methods are refused by ``check_adv_args``.
        """

    @classmethod
    def prepare_model(cls, model: nn.Module, args: argparse.Namespace) -> nn.Module:
        """Converts the model for this method; called before optimiser, EMA and DDP are created."""
        return model

    @classmethod
    def attack_from_args(cls, args: argparse.Namespace, mean=None, std=None, bn_mode: Optional[str] = None,
                         **kwargs) -> PGDAttack:
        """The method's attack from the common ``--adv-*`` flags, filling gaps with its defaults.

        ``bn_mode``: the BN mode without ``--adv-bn-mode`` (default: :attr:`default_bn_mode`). ``kwargs`` go to
        :func:`~timm_adv.attacks.create_attack` (a method's own attack settings).
        """
        d = cls.attack_defaults
        eps = parse_eps(getattr(args, 'adv_eps', None) or d['eps'])

        def pick(name):
            value = getattr(args, f'adv_{name}', None)
            if value is not None:
                return value
            default = d.get(name)
            return default(eps) if callable(default) else default  # eps-dependent defaults, e.g. 1.25 * eps

        return create_attack(
            eps=eps,
            steps=pick('steps'),
            step_size=pick('step_size'),
            norm=pick('norm'),
            random_start=pick('random_start'),
            targeted=pick('targeted'),
            bn_mode=getattr(args, 'adv_bn_mode', None) or bn_mode or cls.default_bn_mode,
            mean=mean,
            std=std,
            num_classes=getattr(args, 'num_classes', None),
            autocast=getattr(args, 'adv_attack_amp', False),
            **kwargs,
        )

    @classmethod
    def from_args(
            cls,
            model: nn.Module,
            criterion: Union[nn.Module, Callable],
            args: argparse.Namespace,
            mean=None,
            std=None,
            device: Optional[torch.device] = None,
    ) -> 'AdversarialTask':
        """Builds the task from parsed arguments."""
        return cls(model, criterion, attack=cls.attack_from_args(args, mean, std), device=device)

    def ideal_cost(self) -> Dict[str, float]:
        """The method's unavoidable work per batch, for benchmarks.

        ``train_steps``: plain training steps (forward, full backward, optimiser step) of one batch;
        ``attack_passes``: forward + input-only backward passes of one batch. The benchmark turns it
        into an ideal time from measured unit costs.
        """
        steps = self.attack.steps * self.attack.restarts if self.attack is not None else 0
        return {'train_steps': 1.0, 'attack_passes': float(steps)}

    def card_details(self) -> Dict[str, str]:
        """Extra ``label -> text`` rows for the exported model card (training-only parts worth naming)."""
        return {}

    def card_images(self, x: torch.Tensor, target: torch.Tensor, folder: str) -> Dict[str, str]:
        """Pictures for the exported model card, drawn from a few normalised validation images.

        Writes them into ``folder``; returns ``caption -> file name`` (none by default).
        """
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each epoch."""

    def export_model(self) -> nn.Module:
        """The plain model for evaluation and export (training-only parts removed)."""
        return self.unwrapped_model

    def export_reference(self) -> nn.Module:
        """The trained model whose eval outputs the exported plain model must reproduce."""
        return self.unwrapped_model

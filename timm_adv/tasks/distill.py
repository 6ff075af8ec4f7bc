"""Adversarial distillation: timm's knowledge-distillation flags on any ``--adv-method``.

A frozen teacher (timm's :class:`~timm.task.DistillationTeacher`: eval mode, its own normalisation)
sees the clean batch; the student's training logits, which the method returns as ``result['output']``
(the adversarial logits for ``pgd``, so the attack is against the student), are pulled toward the
teacher's with timm's logit-distillation loss::

    loss = task_loss_weight * method_loss + distill_loss_weight * T^2 * KL(softmax(t / T) || softmax(s / T))

with timm's weighting modes (:func:`resolve_kd_weights`). ``--kd-distill-type feature`` (MSE on the pooled
pre-logits, through a trainable projection when the dims differ) and ``token`` (a distilled DeiT's
``head_dist`` logits, soft or hard) follow timm's Feature/TokenDistillationTask, read from the method's
training forward by hooks (see :class:`DistillationMixin`). With ``--adv-method pgd`` logit KD is ARD
(Goldblum et al., AAAI 2020; the README maps its flags). The method's file does not change: the task
factory builds a subclass of the method with :class:`DistillationMixin` in front
(:func:`distilled_method`). The teacher is no part of the eval model, the task state or the EMA, so
checkpoints and exports hold the student only (feature KD's projection in ``task_state``); on resume
it is rebuilt from the ``--kd-*`` flags.
"""
import argparse
import copy
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

from timm_adv.utils import CheckpointError
from .registry import get_method

__all__ = ['KD_ARGS', 'KD_DEFAULTS', 'KD_PROJECTION_KEY', 'DistillationMixin', 'add_kd_args', 'check_kd_args',
           'create_teacher', 'distilled_method', 'kd_kl_loss', 'prepare_kd_model', 'resolve_kd_weights']

#: Destinations of the distillation flags (timm's, plus ``--kd-pretrained-path``).
KD_ARGS = ('kd_model_name', 'kd_distill_type', 'kd_loss_type', 'distill_loss_weight', 'task_loss_weight',
           'kd_temperature', 'kd_student_feature_dim', 'kd_teacher_feature_dim', 'kd_token_distill_type',
           'kd_pretrained_path')

#: Defaults of the ``--kd-*`` flags (timm train.py's) and of :meth:`DistillationMixin.set_teacher`.
KD_DEFAULTS = dict(kd_distill_type='logit', kd_loss_type='kl', kd_temperature=4.0, kd_token_distill_type='soft')

#: Attribute of the student holding feature distillation's projection (student dim -> teacher dim) while training.
KD_PROJECTION_KEY = 'kd_projection'


def add_kd_args(parser: argparse.ArgumentParser) -> None:
    """Adds timm train.py's knowledge-distillation flags (same names, defaults, meaning) and ``--kd-pretrained-path``."""
    group = parser.add_argument_group('Knowledge distillation parameters')
    group.add_argument('--kd-model-name', default=None, type=str,
                       help='teacher model for knowledge distillation: a timm name (pretrained weights), '
                            'local-dir:/path or hf-hub:org/name (default: none, no distillation)')
    d = KD_DEFAULTS
    group.add_argument('--kd-distill-type', default=d['kd_distill_type'], choices=('logit', 'feature', 'token'),
                       help='distillation type: logit (method logits vs teacher logits), feature (pooled pre-logits, MSE) '
                            'or token (a distilled DeiT\'s dist head) (default: %(default)s)')
    group.add_argument('--kd-loss-type', default=d['kd_loss_type'], type=str,
                       help='logit distillation loss; only kl (default: %(default)s)')
    group.add_argument('--distill-loss-weight', default=None, type=float,
                       help='weight of the distillation loss; with both weights: task_w * task + distill_w * distill; '
                            'with only --task-loss-weight: task_w * task + (1 - task_w) * distill (default: 1.0)')
    group.add_argument('--task-loss-weight', default=None, type=float,
                       help='weight of the task loss (the method\'s own loss); see --distill-loss-weight (default: 1.0)')
    group.add_argument('--kd-temperature', default=d['kd_temperature'], type=float,
                       help='softmax temperature of the distillation loss (default: %(default)s)')
    group.add_argument('--kd-student-feature-dim', default=None, type=int,
                       help='feature distillation: student feature dimension (default: the student\'s num_features)')
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int,
                       help='feature distillation: teacher feature dimension (default: the teacher\'s num_features)')
    group.add_argument('--kd-token-distill-type', default=d['kd_token_distill_type'], choices=('soft', 'hard'),
                       help='token distillation: soft (KL with --kd-temperature) or hard (CE with the teacher\'s argmax) '
                            '(default: %(default)s)')
    group.add_argument('--kd-pretrained-path', default=None, type=str, metavar='PATH',
                       help='timm-adv: teacher weights from a file (safetensors, or a checkpoint read with '
                            'weights_only) instead of --kd-model-name\'s pretrained weights (default: none)')


def check_kd_args(args: argparse.Namespace, explicit: Optional[Mapping[str, str]] = None) -> None:
    """Fails early, naming the flag, on distillation settings that would be ignored or cannot work.

    Example:
        >>> check_kd_args(parse(['--kd-temperature', '2']), {'kd_temperature': '--kd-temperature'})
        ValueError: --kd-temperature does nothing without --kd-model-name (the teacher); ...
    """
    explicit = explicit or {}
    given = [flag for dest, flag in explicit.items() if dest in KD_ARGS and dest != 'kd_model_name']
    if not getattr(args, 'kd_model_name', None):
        if given:
            raise ValueError(f'{", ".join(given)} {"does" if len(given) == 1 else "do"} nothing without '
                             f'--kd-model-name (the teacher); add --kd-model-name NAME, or drop '
                             f'{"it" if len(given) == 1 else "them"}.')
        return
    for dest, kind in (('kd_student_feature_dim', 'feature'), ('kd_teacher_feature_dim', 'feature'),
                       ('kd_token_distill_type', 'token')):
        if dest in explicit and args.kd_distill_type != kind:
            raise ValueError(f'{explicit[dest]} applies to --kd-distill-type {kind}, not '
                             f'{args.kd_distill_type}; drop it or set --kd-distill-type {kind}.')
    if 'kd_temperature' in explicit and (args.kd_distill_type == 'feature' or (
            args.kd_distill_type == 'token' and args.kd_token_distill_type == 'hard')):
        raise ValueError(f'--kd-temperature does nothing with --kd-distill-type {args.kd_distill_type}'
                         f'{" --kd-token-distill-type hard" if args.kd_distill_type == "token" else ""} (no softmax); '
                         f'drop it.')
    if not args.kd_temperature > 0:
        raise ValueError(f'--kd-temperature must be > 0, got {args.kd_temperature}.')
    if args.kd_loss_type != 'kl':
        raise ValueError(f'--kd-loss-type {args.kd_loss_type!r} is not supported; timm has only kl.')
    method = get_method(args.adv_method)
    if not method.output_is_logits:
        raise ValueError(f'--kd-model-name needs a method that trains class logits; --adv-method {args.adv_method} '
                         f'trains a representation (its output is features). Distil in a later classification '
                         f'stage instead.')


def resolve_kd_weights(
        distill_loss_weight: Optional[float],
        task_loss_weight: Optional[float],
) -> Tuple[float, float]:
    """``(task_weight, distill_weight)`` from the flags, as timm's distillation tasks resolve them.

    Both given: as given; only the distillation weight: task weight 1; only the task weight:
    distillation weight ``1 - task``; neither: both 1.

    Example:
        >>> resolve_kd_weights(None, 0.3)
        (0.3, 0.7)
    """
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm's logit-distillation loss: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * temperature ** 2


def create_teacher(
        args: argparse.Namespace,
        student: nn.Module,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> DistillationTeacher:
    """The frozen teacher named by ``--kd-model-name`` (weights from ``--kd-pretrained-path`` when given).

    timm creates it with ``pretrained=True``: ``local-dir:`` and cached ``hf-hub:`` names load offline;
    a file goes through timm's loader (safetensors, or ``torch.load(weights_only=True)``). ``dtype`` is the
    student's ``--model-dtype``, as timm's train.py gives its distillation tasks.

    Example:
        >>> teacher = create_teacher(args, model)  # args.kd_model_name = 'local-dir:output/export/teacher'
    """
    try:
        teacher = DistillationTeacher(args.kd_model_name, num_classes=student.num_classes,
                                      in_chans=getattr(student, 'in_chans', 3),
                                      pretrained_path=getattr(args, 'kd_pretrained_path', None), device=device,
                                      dtype=dtype)
    except (OSError, RuntimeError) as e:  # a missing file, or one weights_only loading refuses (pickled code)
        path = getattr(args, 'kd_pretrained_path', None)
        source = f'--kd-pretrained-path {path!r}' if path else f'--kd-model-name {args.kd_model_name}'
        reason = ' '.join(str(e).split())  # one line, as every bad-input error
        raise CheckpointError(f'{source}: the teacher\'s weights could not be loaded ({reason}). '
                           f'Offline, export the teacher (python -m timm_adv.hub export CHECKPOINT --out DIR) and pass '
                           f'--kd-model-name local-dir:DIR, or give --kd-pretrained-path FILE.') from e
    return teacher.requires_grad_(False)


def _feature_dim(model: nn.Module) -> int:
    return getattr(model, 'head_hidden_size', None) or model.num_features  # timm's FeatureDistillationTask rule


def prepare_kd_model(model: nn.Module, args: argparse.Namespace,
                     teacher: Optional[DistillationTeacher] = None) -> nn.Module:
    """Checks the student for ``--kd-distill-type`` and adds feature distillation's projection to it.

    Called before the optimiser exists, so the projection (``nn.Linear`` student dim -> teacher dim, only
    when they differ, as in timm) trains with the student under the same optimiser; checkpoints keep it
    in ``task_state`` and :meth:`DistillationMixin.export_model` removes it. The teacher's feature dim is
    read from ``teacher`` (pass the one the task will use, so it is built and loaded once) or, without
    it, from a teacher built here.

    Example:
        >>> teacher = create_teacher(args, model, device, dtype)
        >>> model = prepare_kd_model(get_method(args.adv_method).prepare_model(model, args), args, teacher)
        >>> task = create_task(model, criterion, args, mean=mean, std=std, device=device, teacher=teacher)
    """
    kind = KD_DEFAULTS['kd_distill_type']
    if getattr(args, 'kd_model_name', None):
        kind = getattr(args, 'kd_distill_type', kind)
    if kind == 'token' and not (hasattr(model, 'head_dist') and hasattr(model, 'set_distilled_training')):
        raise ValueError(f'--kd-distill-type token needs a student with a distillation head (head_dist, e.g. '
                         f'--model deit_tiny_distilled_patch16_224); {type(model).__name__} has none. Use '
                         f'--kd-distill-type logit or feature.')
    if kind != 'feature':
        return model
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
        raise ValueError(f'--kd-distill-type feature reads the pooled pre-logit features at the input of the '
                         f'student\'s classifier; {type(model).__name__} has no single classifier module '
                         f'(get_classifier()). Use --kd-distill-type logit.')
    student_dim = args.kd_student_feature_dim or _feature_dim(model)
    teacher_dim = args.kd_teacher_feature_dim or _feature_dim((teacher or create_teacher(args, model)).model)
    if student_dim != teacher_dim:
        device = next(model.parameters()).device
        setattr(model, KD_PROJECTION_KEY, nn.Linear(student_dim, teacher_dim, device=device))
    return model


def _norm_buffer(values: Sequence[float], device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(tuple(values), dtype=dtype, device=device).view(1, -1, 1, 1)


class DistillationMixin:
    """Adds a frozen teacher's distillation term to the method's loss; put it before the method class.

    The teacher sees the clean input, re-normalised from the student's statistics to its own. The
    student term comes from the method's final (training) forward, so with ``pgd`` it is the
    adversarial batch's: ``logit``: ``result['output']``; ``feature``: the pooled pre-logits entering
    the classifier (a forward pre-hook), projected when the dims differ; ``token``: the ``head_dist``
    logits (a forward hook). Hooks record only inside :meth:`forward` and the last call wins: every
    method's attack runs before its training forward. When that forward holds ``[clean; adversarial]``
    (``advprop``, ``advbn``), both parts are pulled to the teacher's clean output. ``task_loss`` (the method's loss) and
    ``kd_loss`` are reported beside the combined ``loss``.
    """

    teacher: DistillationTeacher

    def set_teacher(
            self,
            teacher: DistillationTeacher,
            mean: Sequence[float],
            std: Sequence[float],
            temperature: float = KD_DEFAULTS['kd_temperature'],
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            distill_type: str = KD_DEFAULTS['kd_distill_type'],
            token_distill_type: str = KD_DEFAULTS['kd_token_distill_type'],
    ) -> None:
        """Attaches ``teacher``; ``mean`` / ``std`` are the student's input normalisation (the loader's)."""
        self.teacher = teacher.requires_grad_(False).eval()
        device, dtype = teacher.mean_kd.device, teacher.mean_kd.dtype  # re-normalise in the teacher's dtype
        self.register_buffer('student_mean', _norm_buffer(mean, device, dtype), persistent=False)
        self.register_buffer('student_std', _norm_buffer(std, device, dtype), persistent=False)
        self.temperature = temperature
        self.task_loss_weight, self.distill_loss_weight = resolve_kd_weights(distill_loss_weight, task_loss_weight)
        self.distill_type = distill_type
        self.token_distill_type = token_distill_type
        self._kd_calls: Optional[List[torch.Tensor]] = None
        student = self.unwrapped_model
        if distill_type == 'feature':
            student.get_classifier().register_forward_pre_hook(lambda m, a: self._record(a[0]))
        elif distill_type == 'token':
            student.head_dist.register_forward_hook(lambda m, a, out: self._record(out))

    def _record(self, value: torch.Tensor) -> None:
        if self._kd_calls is not None:
            self._kd_calls.append(value)

    @classmethod
    def from_args(cls, model, criterion, args, mean=None, std=None, device=None, teacher=None):
        """The method's task with ``teacher`` (or one built from the ``--kd-*`` flags in ``--model-dtype``)."""
        task = super().from_args(model, criterion, args, mean=mean, std=std, device=device)
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        if teacher is None:
            dtype = getattr(torch, args.model_dtype) if getattr(args, 'model_dtype', None) else None
            teacher = create_teacher(args, model, device, dtype)
        task.set_teacher(teacher, mean=mean or cfg['mean'], std=std or cfg['std'],
                         temperature=args.kd_temperature, distill_loss_weight=args.distill_loss_weight,
                         task_loss_weight=args.task_loss_weight, distill_type=args.kd_distill_type,
                         token_distill_type=args.kd_token_distill_type)
        return task

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # a teacher's BN / dropout never train
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs):
        """Compiles the student (the method's hook) and the teacher's inference path, as timm does."""
        compiled = super().compile(backend=backend, mode=mode, **compile_kwargs)
        self.teacher.compile(backend=backend, mode=mode, compile_model=self.distill_type != 'feature',
                             compile_features=self.distill_type == 'feature', **compile_kwargs)
        return compiled

    def teacher_logits(self, input: torch.Tensor, features: bool = False) -> torch.Tensor:
        """The teacher's logits (or pooled pre-logits) on ``input`` (normalised for the student), without autograd."""
        with torch.no_grad():
            return self.teacher(self.teacher.normalize_input(input, self.student_mean, self.student_std),
                                return_features=features)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        teacher_out = self.teacher_logits(input, features=self.distill_type == 'feature')
        self._kd_calls = []
        try:
            result = super().forward(input, target)
            student_out = self._kd_calls[-1] if self._kd_calls else result['output']
        finally:
            self._kd_calls = None
        if student_out.shape[0] != teacher_out.shape[0]:
            # advprop / advbn train one [clean; adversarial] forward: each part is pulled to the clean teacher
            teacher_out = teacher_out.repeat(student_out.shape[0] // teacher_out.shape[0], 1)
        if self.distill_type == 'feature':
            projection = getattr(self.unwrapped_model, KD_PROJECTION_KEY, None)
            kd_loss = F.mse_loss(student_out if projection is None else projection(student_out), teacher_out)
        elif self.distill_type == 'token' and self.token_distill_type == 'hard':
            kd_loss = F.cross_entropy(student_out, teacher_out.argmax(dim=-1))
        else:
            kd_loss = kd_kl_loss(student_out, teacher_out, self.temperature)
        task_loss = result['loss']
        result['loss'] = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        result['task_loss'] = task_loss.detach()
        result['kd_loss'] = kd_loss.detach()
        return result

    def ideal_cost(self) -> Dict[str, float]:
        """The method's cost plus one teacher forward of the clean batch (``teacher_passes``)."""
        return {**super().ideal_cost(), 'teacher_passes': 1.0}

    def get_checkpoint_state(self, ema: bool = False, **kwargs) -> Dict[str, Any]:
        """The method's layout, with the projection moved from the state dict to ``task_state['kd_projection']``."""
        state = super().get_checkpoint_state(ema=ema, **kwargs)
        key, task_key = ('state_dict_ema', 'task_state_ema') if ema else ('state_dict', 'task_state')
        prefix = KD_PROJECTION_KEY + '.'
        projection = {k[len(prefix):]: state[key].pop(k) for k in list(state.get(key, {})) if k.startswith(prefix)}
        if projection:
            state[task_key] = {**(state.get(task_key) or {}), KD_PROJECTION_KEY: projection}
        return state

    def load_checkpoint_state(self, state_dict: Dict[str, Any], task_state: Optional[Dict[str, Any]] = None,
                              ema: bool = False, strict: bool = True) -> None:
        task_state = dict(task_state or {})
        projection = task_state.pop(KD_PROJECTION_KEY, {})
        student = unwrap_model(self.get_eval_model(ema=ema))
        if strict and hasattr(student, KD_PROJECTION_KEY) and not projection:
            raise ValueError('--resume: the checkpoint has no feature-distillation projection (task_state["'
                             f'{KD_PROJECTION_KEY}"]); resume with the --kd-* flags of the run that wrote it.')
        state_dict = {**state_dict, **{f'{KD_PROJECTION_KEY}.{k}': v for k, v in projection.items()}}
        super().load_checkpoint_state(state_dict, task_state or None, ema=ema, strict=strict)

    def export_model(self) -> nn.Module:
        """The method's plain model without the feature-distillation projection."""
        model = super().export_model()
        if hasattr(model, KD_PROJECTION_KEY):
            model = copy.deepcopy(model)
            delattr(model, KD_PROJECTION_KEY)
        return model

    def card_details(self) -> Dict[str, str]:
        kind = {'logit': f'logit KD, T={self.temperature:g}', 'feature': 'feature KD (pooled pre-logits, MSE)',
                'token': f'token KD ({self.token_distill_type} on head_dist'
                         f'{f", T={self.temperature:g}" if self.token_distill_type == "soft" else ""})'}
        return {**super().card_details(),
                'distilled from': f'{self.teacher.model.pretrained_cfg.get("architecture", "teacher")} '
                                  f'({kind[self.distill_type]}, task weight {self.task_loss_weight:g}, '
                                  f'distillation weight {self.distill_loss_weight:g}; not part of this model)'}


@lru_cache(maxsize=None)
def distilled_method(method: Type) -> Type:
    """The method's task class with :class:`DistillationMixin` in front (built once per method).

    Example:
        >>> task = distilled_method(get_method('pgd')).from_args(model, criterion, args, mean=mean, std=std)
    """
    return type(f'Distilled{method.__name__}', (DistillationMixin, method), {
        '__doc__': f'{method.__name__} with a distillation teacher (see DistillationMixin).',
        '__module__': __name__,
    })

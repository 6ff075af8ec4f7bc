"""Export a trained model to a plain timm architecture and a Hugging Face Hub folder.

The method's own ``task.export_model()`` hook strips training-only parts (auxiliary BNs, AdvBN
layers, generators, wrappers), so new methods plug in by overriding it. The written folder is then
loaded back exactly as users will load it (``timm.create_model('local-dir:...', pretrained=True)``)
and its outputs are compared with the trained model on a sample batch: an export that changes
them is refused.
"""
import argparse
import inspect
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import resolve_data_config
from timm.models import create_model, save_for_hf

from timm_adv.tasks import AdversarialTask
from timm_adv.utils import atomic_write, check_state_dict_matches, checkpoint_state_dict, read_checkpoint, scrub
from timm_adv.version import __version__

__all__ = ['ExportError', 'ExportedModel', 'task_from_checkpoint', 'export_from_task', 'export_checkpoint',
           'sample_batch', 'compare_outputs', 'label_names_for', 'validation_batch', 'METADATA_KEY']

_logger = logging.getLogger(__name__)

#: Top-level config.json key holding training metadata; timm's loader ignores unknown top-level keys.
METADATA_KEY = 'timm_adv'
_ATOL = 1e-5
_CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


class ExportError(ValueError):
    """A model that cannot be exported as a plain timm model (unreadable checkpoints raise CheckpointError)."""


class ExportedModel:
    """What :func:`export_from_task` returns: the plain model, its folder and the check it passed."""

    def __init__(self, model: nn.Module, folder: str, architecture: str, data_config: Dict, max_abs_diff: float):
        self.model = model
        self.folder = folder
        self.architecture = architecture
        self.data_config = data_config
        self.max_abs_diff = max_abs_diff


def _train_args_with_defaults(train_args: Any) -> argparse.Namespace:
    """Training args from a checkpoint, with flags added to timm-adv since then at their defaults."""
    from timm_adv.tasks import add_adv_args
    parser = argparse.ArgumentParser(add_help=False)
    add_adv_args(parser)
    args = parser.parse_args([])
    source = vars(train_args) if isinstance(train_args, argparse.Namespace) else dict(train_args)
    for key, value in source.items():
        setattr(args, key, value)
    return args


def task_from_checkpoint(path: str, use_ema: bool = False, device: str = 'cpu', flag: str = '--checkpoint'):
    """Rebuilds the training task of a timm-adv checkpoint (as train.py built it) with its weights.

    Args:
        path: A timm-adv training checkpoint (``last.pth.tar``, ``model_best.pth.tar``...).
        use_ema: Load the EMA weights.
        device: Device for the task.
        flag: Command-line flag named in errors.

    Returns:
        ``(task, train_args, data_config)``.

    Raises:
        ExportError: No training args, unknown architecture, or unknown method.
        CheckpointError: Unreadable checkpoint, or weights that do not fit.

    Example:
        >>> task, train_args, data_config = task_from_checkpoint('output/train/run/last.pth.tar')
        >>> plain = task.export_model()
    """
    return _task_from_state(read_checkpoint(path, flag), path, use_ema, device, flag)


def _task_from_state(checkpoint: Any, path: str, use_ema: bool, device: str, flag: str):
    """:func:`task_from_checkpoint` of a checkpoint already read from ``path``."""
    from timm_adv.data import apply_bundled_defaults
    from timm_adv.tasks import get_method
    if not isinstance(checkpoint, Mapping) or checkpoint.get('args') is None:
        raise ExportError(f'{flag} {path!r} holds no training arguments (it was not written by timm-adv train.py); '
                          f'export a live model with timm_adv.hub.export_from_task(model, ...) instead.')
    args = _train_args_with_defaults(checkpoint['args'])
    if not timm.is_model(args.model):
        raise ExportError(f'{flag} {path!r}: architecture {args.model!r} is unknown to timm {timm.__version__}; '
                          f'install the timm version that trained it (pip install -U timm) or register the model '
                          f'before exporting.')
    try:
        method = get_method(args.adv_method)
    except ValueError as e:
        raise ExportError(f'{flag} {path!r}: {e} Install the timm-adv version that trained it.') from None
    if not getattr(args, 'dataset', None) and not getattr(args, 'data_dir', None):
        from timm_adv.data import DEFAULT_DATASET
        args.dataset = DEFAULT_DATASET
    apply_bundled_defaults(args)
    model_kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    model = create_model(args.model, num_classes=args.num_classes, in_chans=getattr(args, 'in_chans', None) or 3,
                         global_pool=getattr(args, 'gp', None), bn_eps=getattr(args, 'bn_eps', None), **model_kwargs)
    data_config = resolve_data_config(vars(args), model=model)
    model = method.prepare_model(model, args)
    task = method.from_args(model, nn.CrossEntropyLoss(), args, mean=data_config['mean'], std=data_config['std'],
                            device=torch.device(device))
    # the task decides its checkpoint layout (AdvProp: plain state_dict + auxiliary BNs in task_state)
    state_dict = checkpoint_state_dict(checkpoint, ema=use_ema)
    check_state_dict_matches(state_dict, task.get_checkpoint_state()['state_dict'], flag, arch=args.model)
    task.load_checkpoint_state(state_dict, checkpoint.get('task_state_ema' if use_ema else 'task_state'))
    return task, args, data_config


def sample_batch(data_config: Mapping, batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random images in [0, 1], normalised with the data config's mean/std."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *data_config['input_size']), generator=generator)
    mean = torch.tensor(data_config['mean']).view(1, -1, 1, 1)
    std = torch.tensor(data_config['std']).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def compare_outputs(reference: nn.Module, candidate: nn.Module, sample: torch.Tensor) -> float:
    """Max absolute difference of the two models' eval-mode outputs on ``sample``."""
    reference.eval()
    candidate.eval()
    device = next(reference.parameters()).device
    a = reference(sample.to(device)).float().cpu()
    b = candidate.to(device)(sample.to(device)).float().cpu()
    if a.shape != b.shape:
        return float('inf')
    return float((a - b).abs().max())


def label_names_for(dataset: Optional[str], num_classes: int) -> Optional[list]:
    """Class names for known datasets: bundled ones, ImageNet-1k (WordNet ids), CIFAR-10/100."""
    from timm_adv.data import BUNDLED_DATASETS, is_bundled
    if is_bundled(dataset):
        classes = list(getattr(BUNDLED_DATASETS[dataset.lower()], 'classes', []))
        return classes if len(classes) == num_classes else None
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        return list(ImageNetInfo('imagenet-1k').label_names())
    if (dataset or '').lower().split('/')[-1] == 'cifar10' and num_classes == 10:
        return list(_CIFAR10_CLASSES)
    return None


def _training_metadata(train_args: Optional[argparse.Namespace], task, extra: Optional[Mapping]) -> Dict:
    meta: Dict[str, Any] = dict(version=__version__)
    if task is not None:
        meta['method'] = task.method_name or type(task).__name__
        if task.attack is not None:
            meta['attack'] = repr(task.attack)
        if task.card_details():
            meta['details'] = dict(task.card_details())
    if train_args is not None:
        args = vars(train_args)
        meta['method_args'] = _method_args(train_args)
        meta['base_weights'] = _base_weights(train_args)
        meta['dataset'] = args.get('dataset') or args.get('data_dir')
        meta['recipe'] = {k: _plain(args.get(k)) for k in (
            'model', 'epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'momentum', 'sched', 'warmup_epochs',
            'smoothing', 'mixup', 'cutmix', 'aa', 'reprob', 'drop_path', 'model_ema', 'amp', 'input_size',
            'seed') if k in args}
        if args.get('model_ema'):
            meta['recipe']['model_ema_decay'] = args.get('model_ema_decay')
    if extra:
        meta.update(extra)
    return scrub(meta)  # published: no tokens, home folders or host names


def _method_args(train_args) -> Dict[str, Any]:
    """The ``--adv-*`` settings the run's method reads (not every method's options), as plain values."""
    from timm_adv.tasks import method_arg_dests
    dests = method_arg_dests(train_args.adv_method)
    return {k: _plain(v) for k, v in sorted(vars(train_args).items()) if k in dests}


def _base_weights(train_args) -> str:
    if getattr(train_args, 'pretrained_path', None):
        return str(train_args.pretrained_path)
    if getattr(train_args, 'initial_checkpoint', None):
        return str(train_args.initial_checkpoint)
    if getattr(train_args, 'pretrained', False):
        return f'timm/{train_args.model} (timm default pretrained tag)'
    return 'none (trained from scratch)'


def _plain(value):
    """YAML/JSON friendly copy of an argument value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def export_from_task(
        task_or_model,
        out_dir: str,
        data_config: Mapping,
        architecture: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        train_args: Optional[argparse.Namespace] = None,
        metadata: Optional[Mapping] = None,
        sample: Optional[torch.Tensor] = None,
        atol: float = _ATOL,
        overwrite: bool = False,
        model_args: Optional[Mapping] = None,
) -> ExportedModel:
    """Strips a trained model to plain timm and writes a verified Hub folder.

    Writes ``config.json`` (plain timm ``architecture``, ``num_classes``, ``label_names``, a full
    ``pretrained_cfg`` with the training input size, mean/std, crop, interpolation and licence, and
    training metadata under the top-level ``timm_adv`` key), ``model.safetensors`` and, when
    ``train_args`` is given, ``training_args.yaml`` (``python train.py --config`` reruns it).
    The model card is written separately (:func:`timm_adv.hub.write_model_card`).

    Args:
        task_or_model: An :class:`AdversarialTask` (its ``export_model()`` is used) or a plain timm model.
        out_dir: Folder to create (refused if it exists and is not empty, unless ``overwrite``).
        data_config: The training data config (input_size, mean, std, crop_pct, interpolation...).
        architecture: timm architecture name (default: the model's ``pretrained_cfg``).
        label_names: Class names, one per output.
        license: Licence identifier for the Hub (``pretrained_cfg['license']``).
        train_args: Training arguments, recorded as metadata and ``training_args.yaml``.
        metadata: Extra entries for the ``timm_adv`` key.
        sample: Normalised input batch for the output check (default: fixed random images).
        atol: Largest accepted output difference, relative to ``1 + max|logit|``.
        overwrite: Replace an existing folder.
        model_args: Architecture arguments the model was built with (``config.json`` ``model_args``, which
            ``create_model`` passes back), e.g. the widths of a variant timm has no name for.

    Raises:
        ExportError: Unknown architecture, training-only parts left in the state dict, or changed outputs.

    Example:
        >>> task, args, data_config = task_from_checkpoint('run/last.pth.tar')
        >>> export_from_task(task, 'hub/resnet10t.pgd_mnist', data_config, train_args=args)
    """
    task, reference, plain = _export_parts(task_or_model)
    architecture = _resolve_architecture(plain, architecture, train_args)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f'Export folder {out_dir!r} exists and is not empty; choose a new --out or pass --overwrite.')
    if sample is None:
        sample = sample_batch(data_config)
    plain.eval()
    reference.eval()
    _check_plain_state_dict(plain, architecture, task)
    data_config = dict(data_config)
    model_config = _model_config(plain, data_config, task, label_names, license, train_args, metadata, model_args)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
    try:
        _write_folder(plain, staging, architecture, data_config, model_config, train_args)
        loaded, diff = _verify_outputs(reference, staging, sample, atol, architecture, task)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    _logger.info(f'Exported plain {architecture} to {out_dir} (max |output diff| {diff:.2e} on {sample.shape[0]} samples)')
    return ExportedModel(loaded, out_dir, architecture, data_config, diff)


def _export_parts(task_or_model) -> Tuple[Any, nn.Module, nn.Module]:
    """``(task or None, reference model, plain model)``: what is compared with what."""
    if not isinstance(task_or_model, AdversarialTask):
        return None, task_or_model, task_or_model
    return task_or_model, task_or_model.export_reference(), task_or_model.export_model()


def _resolve_architecture(plain: nn.Module, architecture: Optional[str], train_args) -> str:
    """The timm architecture name: given, from the model's ``pretrained_cfg``, or the training ``--model``."""
    architecture = architecture or getattr(plain, 'pretrained_cfg', {}).get('architecture') \
        or (getattr(train_args, 'model', None) if train_args is not None else None)
    if not architecture or not timm.is_model(architecture):
        raise ExportError(f'Cannot export: {architecture!r} is not a timm architecture. Pass architecture= with the '
                          f'timm model name the weights belong to.')
    return architecture


def _model_config(plain: nn.Module, data_config: Mapping, task, label_names, license: str, train_args,
                  metadata: Optional[Mapping], model_args: Optional[Mapping]) -> Dict:
    """``config.json`` entries beyond timm's own: ``pretrained_cfg``, labels, model args, training metadata."""
    num_classes = plain.num_classes
    if num_classes == 0 and label_names is not None:  # a feature model: the names label its kNN bank's classes
        metadata = dict(metadata or {}, bank_label_names=list(label_names))
        label_names = None
    if label_names is not None and len(label_names) != num_classes:
        raise ExportError(f'{len(label_names)} label names for a model with {num_classes} outputs; give one name per class.')
    pretrained_cfg = dict(
        input_size=tuple(data_config['input_size']), mean=tuple(data_config['mean']), std=tuple(data_config['std']),
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode', 'center'),
        interpolation=data_config['interpolation'], license=license, num_classes=num_classes,
        tag=(metadata or {}).get('tag') or f'timm_adv_{(task.method_name if task is not None else "") or "export"}')
    model_config = dict(pretrained_cfg=pretrained_cfg,
                        **{METADATA_KEY: _training_metadata(train_args, task, metadata)})
    if label_names:
        model_config['label_names'] = list(label_names)
    if model_args:  # timm < 1.0.31 writes only the model_args it is given
        model_config['model_args'] = dict(model_args)
    return model_config


def _write_folder(plain: nn.Module, folder: str, architecture: str, data_config: Mapping, model_config: Mapping,
                  train_args) -> None:
    """Writes the weights and ``config.json`` with timm's ``save_for_hf`` (and ``training_args.yaml``)."""
    plain_cpu = plain.to('cpu')
    if getattr(plain_cpu, 'pretrained_cfg', None) is None or 'architecture' not in plain_cpu.pretrained_cfg:
        plain_cpu.pretrained_cfg = dict(getattr(plain_cpu, 'pretrained_cfg', None) or {}, architecture=architecture)
    save_kwargs = {}
    if 'data_config' in inspect.signature(save_for_hf).parameters:  # timm >= 1.0.28 resolves it itself
        save_kwargs['data_config'] = {k: data_config[k] for k in ('input_size', 'crop_pct', 'interpolation')}
    save_for_hf(plain_cpu, folder, model_config=model_config, safe_serialization=True, **save_kwargs)
    with open(os.path.join(folder, 'config.json')) as f:
        written = json.load(f)
    if written.get('architecture') != architecture:
        raise ExportError(f'The model reports architecture {written.get("architecture")!r}, expected '
                          f'{architecture!r}; pass architecture= explicitly.')
    if train_args is not None:
        with open(os.path.join(folder, 'training_args.yaml'), 'w') as f:
            yaml.safe_dump(scrub({k: _plain(v) for k, v in vars(train_args).items()}), f, default_flow_style=False)


def _verify_outputs(reference: nn.Module, folder: str, sample: torch.Tensor, atol: float, architecture: str,
                    task) -> Tuple[nn.Module, float]:
    """Loads the folder as users will and refuses it if its outputs differ from the trained model's."""
    loaded = create_model(f'local-dir:{folder}', pretrained=True)
    diff = compare_outputs(reference, loaded, sample)
    with torch.no_grad():
        scale = 1.0 + float(reference(sample.to(next(reference.parameters()).device)).abs().max())
    if not diff <= atol * scale:
        fix = (f"the method's export_model() ({type(task).__name__}) must return a model whose eval outputs "
               f"equal the trained model's" if task is not None else
               'the model holds parts that a plain timm model does not rebuild; export through its task')
        raise ExportError(f'Refusing to export: the plain {architecture} loaded from the folder changes the '
                          f'outputs on a sample batch (max |diff| {diff:.3g} > {atol * scale:.3g}). Fix: {fix}.')
    return loaded, diff


def _check_plain_state_dict(plain: nn.Module, architecture: str, task) -> None:
    """Every exported key must be one that a freshly built plain timm model has."""
    try:
        from timm.models._input import get_model_args
        model_args = get_model_args(plain)
    except ImportError:  # older timm: the factory arguments it kept, plus the head and input size
        model_args = dict(getattr(plain, '_model_args', {}), num_classes=plain.num_classes)
    try:
        fresh = create_model(architecture, **model_args)
    except Exception as e:  # arguments the architecture does not take
        raise ExportError(f'Cannot rebuild {architecture} from the exported model arguments ({e}).') from None
    expected = set(fresh.state_dict())
    extra = sorted(set(plain.state_dict()) - expected)
    missing = sorted(expected - set(plain.state_dict()))
    if extra or missing:
        owner = f"{type(task).__name__}.export_model()" if task is not None else 'the model'
        detail = (f'{len(extra)} training-only keys (e.g. {extra[0]})' if extra else '') + \
                 ('; ' if extra and missing else '') + (f'{len(missing)} missing keys (e.g. {missing[0]})' if missing else '')
        raise ExportError(f'{owner} did not give a plain {architecture}: {detail}. Strip training-only parts in the '
                          f"task's export_model() hook.")


def validation_batch(train_args, data_config: Mapping, num_images: int = 6) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` evenly spaced images of the run's validation split, normalised as in training, and labels.

    Example:
        >>> x, y = validation_batch(train_args, data_config, 6)
    """
    from timm.data import create_transform
    from timm_adv.data import create_dataset, spread_subset
    dataset = create_dataset(getattr(train_args, 'dataset', None), root=getattr(train_args, 'data_dir', None),
                             split=getattr(train_args, 'val_split', None) or 'validation')
    subset = spread_subset(dataset, num_images)
    subset.transform = create_transform(**{k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std',
                                                                       'crop_pct')}, is_training=False)
    images, labels = zip(*(subset[i] for i in range(len(subset))))
    return torch.stack(images), torch.as_tensor(labels)


def _add_card_images(task, train_args, data_config: Mapping, folder: str) -> None:
    """The method's pictures for the card (``task.card_images``), listed in ``config.json`` for the card."""
    if type(task).card_images is AdversarialTask.card_images:  # the method draws none: no data to read
        return
    try:
        x, y = validation_batch(train_args, data_config)
    except (OSError, ValueError, RuntimeError) as e:  # the validation data is not on this machine
        _logger.warning(f'No card pictures: the validation split cannot be read here ({e}).')
        return
    images = task.card_images(x, y, folder)
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        config = json.load(f)
    config[METADATA_KEY]['card_images'] = images

    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(config, f, indent=2)
    atomic_write(path, write)


def _run_validation(state: Mapping, path: str, train_args, task, use_ema: bool) -> Optional[Dict]:
    """The checkpoint epoch's validation figures and protocol as ``train.py`` recorded them, when they are the
    exported weights' (with a validated EMA they are the EMA's; None otherwise)."""
    from timm_adv.evaluation import read_validation
    ema_validated = bool(getattr(train_args, 'model_ema', False)) and not getattr(train_args, 'model_ema_force_cpu', False)
    if use_ema != ema_validated:
        return None
    return read_validation(state, path, default_eps=task.attack_defaults.get('eps', 8 / 255))


def export_checkpoint(
        checkpoint: str,
        out_dir: str,
        use_ema: bool = False,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        metadata: Optional[Mapping] = None,
        overwrite: bool = False,
        knn_bank: bool = False,
) -> Tuple[ExportedModel, argparse.Namespace]:
    """Checkpoint -> task -> ``export_model()`` -> verified Hub folder (see :func:`export_from_task`).

    With ``knn_bank`` (feature models of ``contrastive`` / ``ssat`` runs) the training split is embedded
    with the exported weights and written beside them as ``knn_bank.safetensors``.

    Example:
        >>> exported, train_args = export_checkpoint('output/train/run/last.pth.tar', 'hub/resnet10t.pgd_mnist')
    """
    state = read_checkpoint(checkpoint, '--checkpoint')
    task, train_args, data_config = _task_from_state(state, checkpoint, use_ema, 'cpu', '--checkpoint')
    if knn_bank and not hasattr(task, 'feature_bank'):
        raise ExportError(f'--knn-bank: {checkpoint!r} is a {train_args.adv_method!r} run, not a feature model '
                          f'(--adv-method contrastive or ssat); export it without --knn-bank.')
    if label_names is None:
        label_names = label_names_for(getattr(train_args, 'dataset', None), train_args.num_classes)
    meta = dict(metadata or {})
    meta.setdefault('checkpoint', os.path.basename(checkpoint) + (' (EMA weights)' if use_ema else ''))
    validation = _run_validation(state, checkpoint, train_args, task, use_ema)
    if validation is not None:
        meta.setdefault('validation', validation)
    exported = export_from_task(task, out_dir, data_config, architecture=train_args.model, label_names=label_names,
                                license=license, train_args=train_args, metadata=meta, overwrite=overwrite)
    _add_card_images(task, train_args, data_config, out_dir)
    if knn_bank:
        from timm_adv.models import BANK_FILE, save_feature_bank
        # the task's model holds the exported weights (the EMA ones with use_ema)
        save_feature_bank(task.feature_bank(), os.path.join(out_dir, BANK_FILE), metadata=dict(
            split=getattr(train_args, 'train_split', ''), dataset=scrub(train_args.dataset or train_args.data_dir or ''),
            knn_k=train_args.adv_knn_k, knn_temperature=train_args.adv_knn_temperature))
    return exported, train_args


"""hub_configs/*.yaml -> train -> export -> evaluate -> model card, in one command.

A hub config describes one model we intend to publish::

    repo_id: org/resnet10t.pgd_bundled_mnist
    status: trained | not-yet-trained
    architecture: resnet10t
    method: pgd
    method_args: {adv-eps: 0.1, adv-steps: 3}          # --adv-* flags of train.py
    base_weights: null                                  # or a timm name/tag (--pretrained), or a file (--pretrained-path)
    recipe: null                                        # or a train.py -c YAML under recipes/
    dataset: bundled/mnist                              # train.py --dataset
    data_dir: null                                      # or a path (overridable on the command line)
    train_args: {epochs: 3, batch-size: 64, lr: 0.05}   # any other train.py flags
    evaluation: {num-samples: 1000, attack: pgd, eps: [0.05, 0.1], steps: 20, autoattack: standard, ...}
    license: apache-2.0

A config with ``status: imported`` publishes a model someone else trained, imported from a published
zoo (:mod:`timm_adv.hub.zoo`): ``source: robustbench:<name>`` replaces ``method`` and the training
keys, and the pipeline imports instead of training (``--checkpoint`` is then the weights file the
source's loader reads).

Training and evaluation run ``train.py`` and ``validate.py`` as the user would, so the command in
the card is the exact one that produced the weights; the evaluation runs on the exported folder
(``local-dir:``), i.e. on exactly what gets published.
"""
import json
import logging
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence

import yaml

__all__ = ['REQUIRED_KEYS', 'IMPORTED_KEYS', 'load_hub_config', 'train_command', 'validate_command', 'run_pipeline',
           'evaluate_export']

_logger = logging.getLogger(__name__)

REQUIRED_KEYS = ('repo_id', 'status', 'architecture', 'method', 'dataset', 'license', 'evaluation')
#: ``status: imported``: the published model's ``source`` (``robustbench:<name>``) instead of a method.
IMPORTED_KEYS = ('repo_id', 'status', 'architecture', 'source', 'dataset', 'license', 'evaluation')
_STATUSES = ('trained', 'not-yet-trained', 'imported')


def load_hub_config(path: str, check_method: bool = True) -> Dict:
    """Reads and checks a hub config; errors name the missing or bad key.

    ``check_method=False`` skips the check that the method is registered in this installation.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Hub config {path!r} does not exist; see hub_configs/ for examples.')
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    missing = [k for k in (IMPORTED_KEYS if config.get('status') == 'imported' else REQUIRED_KEYS) if k not in config]
    if missing:
        raise ValueError(f'Hub config {path!r} lacks {", ".join(missing)}.')
    if config['status'] not in _STATUSES:
        raise ValueError(f'Hub config {path!r}: status must be one of {_STATUSES}, got {config["status"]!r}.')
    if str(config['repo_id']).count('/') != 1:
        raise ValueError(f'Hub config {path!r}: repo_id must look like org/name, got {config["repo_id"]!r}.')
    if config['status'] == 'imported':
        return _check_imported(config, path)
    import timm
    if not timm.is_model(config['architecture']):
        raise ValueError(f'Hub config {path!r}: architecture {config["architecture"]!r} is unknown to timm.')
    base = config.get('base_weights')
    if base and not _is_weights_file(base) and timm.is_model(base) and not (
            base == config['architecture'] or str(base).startswith(config['architecture'] + '.')):
        raise ValueError(f'Hub config {path!r}: base_weights {base!r} are not weights of architecture '
                         f'{config["architecture"]!r}; give a tag of it, e.g. {config["architecture"]}.mae.')
    if config.get('recipe') and not os.path.isfile(os.path.join(_repo_root(), config['recipe'])):
        raise FileNotFoundError(f'Hub config {path!r}: recipe {config["recipe"]!r} not found under {_repo_root()}.')
    if check_method:
        from timm_adv.tasks import get_method
        get_method(config['method'])
    return config


def _check_imported(config: Dict, path: str) -> Dict:
    from .zoo import get_zoo_entry
    try:
        entry = get_zoo_entry(config['source'])
    except ValueError as e:
        raise ValueError(f'Hub config {path!r}: {e}') from None
    if config['architecture'] != entry.architecture:
        raise ValueError(f'Hub config {path!r}: {entry.spec} imports as {entry.architecture!r}, not '
                         f'{config["architecture"]!r}.')
    if config['license'] != entry.license:
        raise ValueError(f'Hub config {path!r}: the licence of {entry.spec} is {entry.license!r} '
                         f'({entry.license_note}), not {config["license"]!r}.')
    return config


def _is_weights_file(name: str) -> bool:
    return str(name).endswith(('.pth', '.pt', '.bin', '.safetensors', '.tar')) or os.sep in str(name)


def _flags(options: Optional[Mapping]) -> List[str]:
    """``{'adv-eps': 0.1, 'no-aug': True, 'eps': [1, 2]}`` -> ``['--adv-eps', '0.1', '--no-aug', '--eps', '1', '2']``."""
    out: List[str] = []
    for key, value in (options or {}).items():
        flag = '--' + str(key).replace('_', '-')
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name: str) -> str:
    path = os.path.join(_repo_root(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{name} not found next to the timm_adv package ({path}); run the pipeline from a '
                                f'clone of the timm-adv repository.')
    return path


def _data_flags(config: Mapping, data_dir: Optional[str]) -> List[str]:
    flags = ['--dataset', str(config['dataset'])] if config.get('dataset') else []
    data_dir = data_dir or config.get('data_dir')
    if data_dir:
        flags += ['--data-dir', str(data_dir)]
    return flags


def train_command(config: Mapping, output: str, experiment: str, data_dir: Optional[str] = None) -> List[str]:
    """The train.py command line for a hub config."""
    argv, arch = ['train.py'], config['architecture']
    model = arch
    if config.get('recipe'):
        recipe = os.path.join(_repo_root(), config['recipe'])
        argv += ['-c', recipe]
        with open(recipe) as f:
            model = (yaml.safe_load(f) or {}).get('model') or arch  # e.g. the .mae tag: its pretrained_cfg
    base = config.get('base_weights')
    if base and not _is_weights_file(base):
        model = base
    if model != arch and not str(model).startswith(arch + '.'):
        model = arch
    argv += ['--model', model, '--adv-method', config['method']]
    argv += _data_flags(config, data_dir)
    if base:
        argv += ['--pretrained'] + (['--pretrained-path', str(base)] if _is_weights_file(base) else [])
    argv += _flags(config.get('method_args'))
    argv += _flags(config.get('train_args'))
    argv += ['--output', output, '--experiment', experiment]
    return argv


def validate_command(config: Mapping, model: str, report_dir: str, data_dir: Optional[str] = None) -> List[str]:
    """The validate.py command line evaluating an exported folder as configured."""
    argv = ['validate.py', '--model', model, '--pretrained'] + _data_flags(config, data_dir)
    argv += _flags(config['evaluation'])
    argv += ['--report-dir', report_dir]
    return argv


def _run(argv: List[str], log_path: str) -> None:
    """Runs a repository script with this interpreter; output goes to the console and a log file."""
    command = [sys.executable, _script(argv[0])] + argv[1:]
    _logger.info('Running: ' + ' '.join(shlex.quote(a) for a in command))
    with open(log_path, 'w') as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=_repo_root())
        for line in process.stdout:
            log.write(line)
            sys.stderr.write(line)
        if process.wait() != 0:
            raise RuntimeError(f'{argv[0]} failed (exit {process.returncode}); see {log_path}.')


def evaluate_export(folder: str, train_args, eps: Sequence[float], samples: int = 1000, steps: int = 20,
                    autoattack_samples: int = 0, log_path: Optional[str] = None) -> Dict:
    """Evaluates an export folder with validate.py on its training run's validation split.

    Clean top-1 on the whole split, PGD top-1 at each ``eps`` on ``samples`` evenly spaced images and,
    with ``autoattack_samples``, official AutoAttack (standard) at the largest ``eps``. The report,
    ``robustness.json`` / ``robustness.md`` and the accuracy-vs-eps plot are written into ``folder``.

    Args:
        folder: The export folder.
        train_args: The run's training arguments (dataset, data dir, validation split).
        eps: PGD radii in pixel units.
        samples: Images attacked at each eps.
        steps: PGD steps.
        autoattack_samples: Images for AutoAttack (0: none).
        log_path: validate.py's output (default: ``<folder>-validate.log`` beside the folder).

    Returns:
        Dict with ``report``, ``plots`` (name -> file in ``folder``) and ``command`` (the validate.py argv).

    Example:
        >>> evaluate_export('hub/run', train_args, eps=[0.05, 0.1, 0.15], samples=1000)['report']['pgd'][1]['top1']
    """
    evaluation = {'split': getattr(train_args, 'val_split', None), 'attack': 'pgd', 'eps': list(eps), 'steps': steps,
                  'attack-samples': samples, 'workers': 0}
    if autoattack_samples:
        evaluation.update({'autoattack': 'standard', 'aa-eps': max(eps), 'aa-samples': autoattack_samples})
    config = dict(dataset=getattr(train_args, 'dataset', None), data_dir=getattr(train_args, 'data_dir', None),
                  evaluation=evaluation)
    argv = validate_command(config, f'local-dir:{folder}', folder)
    _run(argv, log_path or os.path.abspath(folder) + '-validate.log')  # beside the folder: not published
    with open(os.path.join(folder, 'robustness.json')) as f:
        report = json.load(f)
    plots = {name: f'{name}.png' for name in ('accuracy_vs_eps',) if os.path.isfile(os.path.join(folder, f'{name}.png'))}
    return dict(report=report, plots=plots, command=argv)


def run_pipeline(config_path: str, out_dir: str, data_dir: Optional[str] = None, checkpoint: Optional[str] = None,
                 publish: bool = False, dry_run: bool = True, overwrite: bool = False) -> Dict:
    """Config -> train -> export -> evaluate -> model card (-> publish).

    Args:
        config_path: A hub_configs YAML.
        out_dir: Working folder: ``train/`` (run), ``export/`` (the Hub folder), logs.
        data_dir: Dataset location (overrides the config's ``data_dir``).
        checkpoint: Skip training and export this checkpoint.
        publish: Upload the folder at the end (dry run unless ``dry_run=False``).
        dry_run: With ``publish``, only check the folder.
        overwrite: Replace an existing export folder.

    Returns:
        Dict with the paths written, the report and the commands run.

    Example:
        >>> run_pipeline('hub_configs/resnet10t_pgd_mnist.yaml', '/tmp/hub-demo')
    """
    from .export import export_checkpoint
    from .model_card import write_model_card
    from .publish import publish_folder

    config = load_hub_config(config_path)
    os.makedirs(out_dir, exist_ok=True)
    if config['status'] == 'imported':
        return _run_imported(config, out_dir, data_dir, checkpoint, publish, dry_run, overwrite)
    experiment = config['repo_id'].split('/')[-1]
    train_argv = train_command(config, os.path.join(out_dir, 'train'), experiment, data_dir)
    if checkpoint is None:
        _run(train_argv, os.path.join(out_dir, 'train.log'))
        checkpoint = os.path.join(out_dir, 'train', experiment, 'last.pth.tar')
    export_dir = os.path.join(out_dir, 'export')
    exported, _ = export_checkpoint(checkpoint, export_dir, license=config['license'],
                                    metadata=dict(repo_id=config['repo_id'], hub_config=os.path.basename(config_path),
                                                  train_command=' '.join(shlex.quote(a) for a in train_argv)),
                                    overwrite=overwrite)
    validate_argv = validate_command(config, f'local-dir:{export_dir}', export_dir, data_dir)
    _run(validate_argv, os.path.join(out_dir, 'validate.log'))
    with open(os.path.join(export_dir, 'robustness.json')) as f:
        report = json.load(f)
    plots = {name: f'{name}.png' for name in ('accuracy_vs_eps', 'accuracy_vs_severity')
             if os.path.isfile(os.path.join(export_dir, f'{name}.png'))}
    card = write_model_card(export_dir, config['repo_id'], report=report, hub_config=config, plots=plots,
                            train_command='python ' + ' '.join(shlex.quote(a) for a in train_argv))
    result = dict(checkpoint=checkpoint, export_dir=export_dir, model_card=card, report=report,
                  train_command=train_argv, validate_command=validate_argv, max_abs_diff=exported.max_abs_diff)
    if publish:
        result['publish'] = publish_folder(export_dir, config['repo_id'], private=bool(config.get('private', False)),
                                           dry_run=dry_run)
    return result


def _run_imported(config: Mapping, out_dir: str, data_dir: Optional[str], weights: Optional[str], publish: bool,
                  dry_run: bool, overwrite: bool) -> Dict:
    """Import -> evaluate -> model card (-> publish) for a ``status: imported`` config."""
    from .model_card import write_model_card
    from .publish import publish_folder
    from .zoo_import import import_zoo_model
    export_dir = os.path.join(out_dir, 'export')
    imported = import_zoo_model(config['source'], export_dir, weights=weights, repo_id=config['repo_id'],
                                overwrite=overwrite)
    validate_argv = validate_command(config, f'local-dir:{export_dir}', export_dir, data_dir)
    _run(validate_argv, os.path.join(out_dir, 'validate.log'))
    with open(os.path.join(export_dir, 'robustness.json')) as f:
        report = json.load(f)
    card = write_model_card(export_dir, config['repo_id'], report=report, hub_config=config)
    result = dict(export_dir=export_dir, model_card=card, report=report, validate_command=validate_argv,
                  max_abs_diff=imported['max_abs_diff'], source_max_abs_diff=imported['source_max_abs_diff'])
    if publish:
        result['publish'] = publish_folder(export_dir, config['repo_id'], private=bool(config.get('private', False)),
                                           dry_run=dry_run)
    return result

"""Bulk validation like timm's validate.py: model globs and lists, checkpoint folders, batch-size retry."""
import csv
import glob
import json
import logging
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
from timm.models import is_model, list_models
from timm.utils import check_batch_size_retry, decay_batch_step, natural_key

from timm_adv.utils import atomic_write

__all__ = ['NON_IN1K_FILTERS', 'list_bulk_models', 'run_with_retry', 'write_results']

_logger = logging.getLogger(__name__)

#: Pretrained tags ``--model all`` leaves out, as timm's validate.py does (not ImageNet-1k classifiers).
NON_IN1K_FILTERS = ('*_in21k', '*_in22k', '*in12k', '*_dino', '*fcmae', '*seer')

#: Errors that fail one model of a bulk run, not the run: timm catches RuntimeError (unknown model,
#: out of memory); a missing checkpoint or weights file, or a bad configuration, fail alike.
MODEL_ERRORS = (RuntimeError, ValueError, OSError)


def list_bulk_models(model: str, checkpoint: str = '') -> List[Tuple[str, str]]:
    """The ``(model, checkpoint)`` pairs of a bulk run, or ``[]`` for a single-model run.

    timm's rules, in its order: a ``--checkpoint`` folder evaluates its ``*.pth.tar`` / ``*.pth`` files
    (natural order) with ``model``; ``all`` is every model with pretrained ImageNet-1k weights; a name
    that is not a model is a wildcard over pretrained models (``'resnet*'``, tags included); a file
    that matches no model lists one model name per line. Names from a glob or a file load their
    pretrained weights (an empty checkpoint).

    Example:
        >>> list_bulk_models('test_efficientnet_[gl]n*')
        [('test_efficientnet_gn.r160_in1k', ''), ('test_efficientnet_ln.r160_in1k', '')]
    """
    if checkpoint and os.path.isdir(checkpoint):
        files = glob.glob(os.path.join(checkpoint, '*.pth.tar')) + glob.glob(os.path.join(checkpoint, '*.pth'))
        if not files:
            raise FileNotFoundError(f'--checkpoint {checkpoint!r} is a folder without *.pth.tar / *.pth files; '
                                    f'point it at a checkpoint file or a folder of them.')
        return [(model, c) for c in sorted(files, key=natural_key)]
    if model == 'all':
        return [(n, '') for n in list_models(pretrained=True, exclude_filters=list(NON_IN1K_FILTERS))]
    names = []
    if not is_model(model) and not model.startswith(('hf-hub:', 'local-dir:')):
        names = list_models(model, pretrained=True)
    if not names and os.path.isfile(model):
        with open(model) as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise ValueError(f'--model {model!r}: the model list file is empty; write one model name per line.')
    return [(n, '') for n in names]


def run_with_retry(validate_fn: Callable[[], Dict], args, batch_size: int, retry: bool = True,
                   catch: Sequence[type] = MODEL_ERRORS) -> Dict:
    """Runs ``validate_fn`` with ``args.batch_size``; on error halves it and retries, like timm's ``_try_run``.

    Errors that a smaller batch cannot fix (timm's ``check_batch_size_retry``, or ``retry=False``)
    end the attempts. A failure gives ``{'model': ..., 'error': message}`` instead of raising, so one
    model cannot end a bulk run.

    Example:
        >>> run_with_retry(lambda: validate(args), args, batch_size=256)
    """
    error = 'Unknown'
    while batch_size:
        args.batch_size = batch_size * max(args.num_gpu, 1)  # timm's DataParallel convention
        try:
            if torch.cuda.is_available() and 'cuda' in str(args.device):
                torch.cuda.empty_cache()
            return validate_fn()
        except tuple(catch) as e:
            error = str(e)
            _logger.error(f'"{error}" while validating {args.model}.')
            if not retry or not isinstance(e, RuntimeError) or not check_batch_size_retry(error):
                break
        batch_size = decay_batch_step(batch_size)
        if batch_size:
            _logger.warning(f'Reducing batch size to {batch_size} for retry.')
    _logger.error(f'{args.model} failed to validate ({error}).')
    return OrderedDict(model=args.model, error=error)


def write_results(results_file: str, results: Union[Dict, List[Dict]], format: str = 'csv') -> None:
    """Writes one row per model (csv: the union of the rows' columns, in first-seen order; json: a list).

    Example:
        >>> write_results('results.csv', [{'model': 'a', 'top1': 70.1}, {'model': 'b', 'top1': 69.0}])
    """
    rows = results if isinstance(results, (list, tuple)) else [results]

    def write(tmp):
        with open(tmp, mode='w', newline='') as f:
            if format == 'json':
                json.dump(list(rows), f, indent=4)
                return
            fields = list(OrderedDict((k, None) for row in rows for k in row))
            writer = csv.DictWriter(f, fieldnames=fields, restval='')
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(results_file, write)

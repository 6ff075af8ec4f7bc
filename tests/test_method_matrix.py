"""Every registered method through train.py: one tiny epoch, its checkpoint, a resume, a Hub export loaded in
plain timm.

The cases are read from the task registry when the tests are collected, so a newly registered method runs here
without a test of its own. Flags that shrink the work (``SHRINK``) go to whichever method reads them; a method that
needs a component (a VQGAN, a stage-1 checkpoint, weights to fine-tune) gets a tiny one from the session fixtures
of conftest.py, named in ``COMPONENTS``. Any other method runs on the common flags alone. Two more cases run
``pgd`` with what wraps a method: a distillation teacher, and a ViT fine-tuned from an MAE pre-training file.
"""
import copy
import logging

import pytest
import timm
import torch

from timm_adv.cli import train  # train.py, called through main(argv)
from timm_adv.hub import export_checkpoint, sample_batch, task_from_checkpoint
from timm_adv.tasks import get_method, list_methods, method_args
from timm_adv.utils import read_checkpoint

# test_resnet at 32 px on 4 bundled digits: one batch an epoch, validated on 4 digits, 2 of them attacked (1 step)
COMMON = ['--model', 'test_resnet', '--img-size', '32', '-b', '4', '--train-num-samples', '4',
          '--val-num-samples', '4', '--adv-val-samples', '2', '--adv-val-steps', '1', '--no-aug', '--workers', '0',
          '--warmup-epochs', '0', '--log-interval', '1000']

# {flag destination: flags}, given to every method that reads the flag: the least work each part can do
SHRINK = {
    'adv_steps': ['--adv-steps', '1'],
    'adv_advbn_steps': ['--adv-advbn-steps', '1'],
    'adv_knn_bank_samples': ['--adv-knn-bank-samples', '16'],  # a kNN bank of 16 training digits
    'adv_knn_k': ['--adv-knn-k', '3'],
    'adv_ssat_guides': ['--adv-ssat-guides', '2'],
}

# {component: (conftest fixture, flags)}, '{}' standing for the fixture's path
COMPONENTS = {
    'dat': ('vqgan_dir', ['--adv-dat-vqgan', '{}']),
    'ssat': ('stage1_checkpoint', ['--pretrained', '--pretrained-path', '{}']),
    'advbn': ('plain_checkpoint', ['--initial-checkpoint', '{}']),  # the paper fine-tunes a trained model
    'kd': ('teacher_dir', ['--kd-model-name', 'local-dir:{}']),
    'mae': ('mae_path', ['--model', 'test_vit', '--model-kwargs', 'patch_size=4', 'img_size=32', '--gp', 'avg',
                         '--pretrained', '--pretrained-path', '{}']),
}

# every registered method on its own (its name is its component key), then pgd with a teacher and from MAE weights
CASES = [pytest.param(method, (method,), id=method) for method in list_methods()] + \
        [pytest.param('pgd', ('pgd', 'kd'), id='pgd+kd'), pytest.param('pgd', ('pgd', 'mae'), id='pgd+mae')]


@pytest.fixture(scope='module')
def mae_path(mae_file):
    return mae_file[0]


def _argv(method, components, request):
    reads = method_args(method) | set(get_method(method).uses_args)
    argv = [*COMMON, '--adv-method', method]
    for dest, flags in SHRINK.items():
        if dest in reads:
            argv += flags
    for name in components:
        if name in COMPONENTS:
            fixture, flags = COMPONENTS[name]
            path = request.getfixturevalue(fixture)
            argv += [f.format(path) for f in flags]
    return argv


def _assert_same(saved, live, where='checkpoint'):
    """Nested checkpoint entries equal: tensors bit for bit, everything else by ``==``."""
    if isinstance(saved, torch.Tensor):
        assert torch.equal(saved, live), where
    elif isinstance(saved, dict):
        assert saved.keys() == live.keys(), where
        for k in saved:
            _assert_same(saved[k], live[k], f'{where}.{k}')
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(live), where
        for i, (a, b) in enumerate(zip(saved, live)):
            _assert_same(a, b, f'{where}[{i}]')
    else:
        assert saved == live, where


@pytest.mark.parametrize('method,components', CASES)
def test_method_trains_resumes_and_exports_to_plain_timm(method, components, request, tmp_path, monkeypatch):
    monkeypatch.setattr(logging.root, 'handlers', [])  # train.main adds one per call
    argv = [*_argv(method, components, request), '--output', str(tmp_path), '--experiment', 'run']
    train.main([*argv, '--epochs', '1'])
    last = tmp_path / 'run' / 'last.pth.tar'
    first = read_checkpoint(str(last))
    assert first['epoch'] == 0 and first['args'].adv_method == method

    # the resumed run starts its second epoch from exactly the saved model and method state
    started = {}
    real_train_one_epoch = train.train_one_epoch

    def recording(epoch, task, *a, **k):
        started.setdefault(epoch, copy.deepcopy(task.get_checkpoint_state()))  # before the epoch changes it
        return real_train_one_epoch(epoch, task, *a, **k)

    monkeypatch.setattr(train, 'train_one_epoch', recording)
    train.main([*argv, '--epochs', '2', '--resume', str(last)])
    assert list(started) == [1]
    _assert_same({k: first[k] for k in started[1]}, started[1])
    assert read_checkpoint(str(last))['epoch'] == 1

    export_checkpoint(str(last), str(tmp_path / 'hub'))
    plain = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert type(plain) is type(timm.create_model(first['args'].model))  # the architecture itself, no wrapper
    task, _, data_config = task_from_checkpoint(str(last))
    x = sample_batch(data_config, batch_size=4, seed=1)
    with torch.no_grad():
        assert torch.equal(plain(x), task.export_reference().eval()(x))

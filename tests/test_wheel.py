"""The wheel carries the package and its commands: built here, installed in a fresh venv outside the checkout.

From a folder outside the checkout the installed ``timm-adv-*`` commands print the same help as the
checkout's parsers, train one tiny epoch on the bundled digits, export the run, and a python that never
imports timm_adv loads the export in plain timm with the trained outputs. The venv takes the
dependencies from this test's own environment (a ``.pth`` file naming its site-packages), so nothing is
downloaded: what the wheel itself lacks still fails.
"""
import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest
import timm
import torch

from timm_adv.cli import train, validate
from timm_adv.hub.__main__ import _parser as hub_parser
from timm_adv.utils import checkpoint_state_dict, read_checkpoint
from timm_adv.vqgan.__main__ import _parser as vqgan_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = '100'  # argparse wraps help to the terminal width: the same in both processes
TINY_RUN = ['--model', 'test_resnet', '--no-aug', '-b', '32', '--lr', '0.1', '--warmup-epochs', '0', '--workers', '0',
            '--epochs', '1', '--train-num-samples', '64', '--val-num-samples', '32', '--adv-method', 'pgd',
            '--adv-steps', '1', '--adv-eps', '0.1', '--adv-val-samples', '32', '--adv-val-steps', '1']


def _run(command, cwd, env, timeout=300):
    run = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f'{command[0]}: {run.stderr[-3000:]}'
    return run.stdout


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
    """A venv holding only the wheel (built from a copy of the sources, so the checkout stays clean)."""
    root = tmp_path_factory.mktemp('wheel')
    src = root / 'src'
    shutil.copytree(os.path.join(REPO, 'timm_adv'), src / 'timm_adv', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(os.path.join(REPO, name), src / name)
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q',
          '-w', root / 'dist', src], root, None)
    wheel, = glob.glob(str(root / 'dist' / 'timm_adv-*.whl'))
    venv = root / 'venv'
    _run([sys.executable, '-m', 'venv', '--without-pip', venv], root, None)
    python = venv / 'bin' / 'python'
    _run([sys.executable, '-m', 'pip', '--python', python, 'install', '--no-deps', '--no-index', '--no-compile', '-q',
          wheel], root, None)
    # installed first, so pip saw an empty venv; this environment's packages come after the venv's own
    venv_site = _run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], root, None).strip()
    deps = dict.fromkeys([*site.getsitepackages(), *(sysconfig.get_paths()[k] for k in ('purelib', 'platlib'))])
    with open(os.path.join(venv_site, 'test_dependencies.pth'), 'w') as f:
        f.write('\n'.join(deps) + '\n')
    return venv


def test_installed_commands_train_export_and_load_in_plain_timm(venv, tmp_path, monkeypatch):
    bin_dir, work = venv / 'bin', tmp_path / 'work'  # run outside the checkout: nothing of it on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(COLUMNS=COLUMNS, HF_HUB_OFFLINE='1')
    monkeypatch.setenv('COLUMNS', COLUMNS)
    where = _run([bin_dir / 'python', '-c', 'import timm_adv; print(timm_adv.__file__)'], work, env)
    assert where.startswith(str(venv)), where

    expected = {'timm-adv-train': train.build_parser(), 'timm-adv-validate': validate.build_parser(),
                'timm-adv-hub': hub_parser(), 'timm-adv-vqgan': vqgan_parser()}
    expected['timm-adv-train'].prog, expected['timm-adv-validate'].prog = 'timm-adv-train', 'timm-adv-validate'
    helps = {name: subprocess.Popen([bin_dir / name, '--help'], cwd=work, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in expected}  # concurrently
    for name, process in helps.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f'{name} --help: {err[-3000:]}'
        assert out == expected[name].format_help(), name

    _run([bin_dir / 'timm-adv-train', *TINY_RUN, '--output', 'out', '--experiment', 'tiny'], work, env)
    checkpoint = work / 'out' / 'tiny' / 'last.pth.tar'
    assert (work / 'out' / 'tiny' / 'summary.csv').exists()
    exported = _run([bin_dir / 'timm-adv-hub', 'export', checkpoint, '--out', 'export'], work, env)
    assert json.loads(exported[exported.index('{'):])['max_abs_diff'] == 0.0

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, work / 'x.pt')
    script = ('import sys, timm, torch\n'
              "model = timm.create_model('local-dir:export', pretrained=True).eval()\n"
              "with torch.no_grad(): torch.save(model(torch.load('x.pt')), 'y.pt')\n"
              "assert not any(m.startswith('timm_adv') for m in sys.modules), 'plain timm imported timm_adv'\n")
    _run([bin_dir / 'python', '-c', script], work, env)

    trained = timm.create_model('test_resnet', num_classes=10)
    trained.load_state_dict(checkpoint_state_dict(read_checkpoint(str(checkpoint), '--resume')))
    with torch.no_grad():
        assert torch.equal(torch.load(work / 'y.pt'), trained.eval()(x))

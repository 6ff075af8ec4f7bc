"""Declared dependency minimums cover the APIs the code calls; the README names the versions CI pins."""
import inspect
import os
import re

from packaging.version import Version

from timm_adv.layers import transparent
from timm_adv.utils import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def _minimums():
    deps = re.search(r'^dependencies = \[(.*?)^\]', _read('pyproject.toml'), re.S | re.M).group(1)
    return {name.lower(): Version(v) for name, v in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps)}


def test_every_core_dependency_declares_a_minimum():
    assert {'torch', 'torchvision', 'timm', 'huggingface-hub', 'safetensors'} <= set(_minimums())


def test_torch_minimum_has_the_public_apis_we_call():
    # public since torch 2.5 (pytorch#131690; DualBatchNorm2d and AdvBN keep their child's keys through
    # them); safe_globals as a context manager since 2.5 too
    assert 'register_state_dict_post_hook' in inspect.getsource(transparent)
    assert 'register_load_state_dict_pre_hook' in inspect.getsource(transparent)
    assert 'safe_globals' in inspect.getsource(checkpoint)
    minimums = _minimums()
    assert minimums['torch'] >= Version('2.5') and minimums['torchvision'] >= Version('0.20')


def test_timm_minimum_has_the_task_api():
    # timm.task (1.0.23), the task checkpoint state save / resume (1.0.27), loaders without workers (1.0.29)
    assert _minimums()['timm'] >= Version('1.0.29')


def test_readme_names_the_versions_ci_pins():
    readme = _read('README.md')
    pins = re.findall(r'(torch|torchvision)==([0-9.]+)', _read('.ci/run'))
    assert pins
    for name, version in pins:
        assert f'{name} {version}' in readme, f'README should say the suite runs on {name} {version}'
        assert f'{name}=={version}' in readme  # the install command CI runs

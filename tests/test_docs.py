"""The documentation site builds with ``mkdocs build --strict`` and its CLI reference covers every option."""
import argparse
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cli_hook():
    spec = importlib.util.spec_from_file_location('cli_reference', os.path.join(REPO, 'docs', 'hooks', 'cli_reference.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _option_strings(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _option_strings(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield from action.option_strings


@pytest.mark.skipif(importlib.util.find_spec('mkdocs') is None,
                    reason="mkdocs is not installed: pip install -e '.[docs]' (CI installs it)")
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
    result = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    cli_page = (tmp_path / 'site' / 'cli' / 'index.html').read_text()
    assert '--adv-method' in cli_page and '<!-- cli-reference -->' not in cli_page  # the hook replaced its marker
    for package in ('attacks', 'layers', 'tasks', 'data', 'evaluation', 'hub', 'models', 'vqgan', 'utils', 'loss'):
        assert f'id="timm_adv.{package}.' in (tmp_path / 'site' / 'api' / package / 'index.html').read_text(), package


def test_cli_reference_lists_every_option_of_every_parser():
    hook = _load_cli_hook()
    page = hook.render_cli_reference()
    for _, module, attribute in hook.COMMANDS:
        for option in _option_strings(hook.load_parser(module, attribute)):
            assert f'{option}' in page.replace('&#95;', '_'), f'{module}.{attribute}: {option} missing from the CLI page'
    assert '### timm-adv-hub export' in page and '### timm-adv-vqgan fit' in page


def test_docs_and_readme_point_nowhere_outside_the_repo():
    internal_notes = '/'.join(('shared', 'methods'))  # spelt in pieces so that a grep for it finds no file
    for path in [os.path.join(REPO, 'README.md'), *glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True)]:
        with open(path) as f:
            text = f.read()
        assert internal_notes not in text and '../shared' not in text, path

"""Every command of the README and the documentation pages parses with the command's own parser (none is run).

A command is a line of a fenced ``bash`` block that calls ``train.py`` / ``validate.py`` (``python``,
``torchrun``, or the installed ``timm-adv-train`` / ``timm-adv-validate``) or ``python -m timm_adv.hub`` /
``python -m timm_adv.vqgan`` (``timm-adv-hub`` / ``timm-adv-vqgan``).
"""
import glob
import os
import re
import shlex

import pytest

from timm_adv.cli import train
from timm_adv.cli import validate
from timm_adv.hub.__main__ import _parser as hub_parser
from timm_adv.vqgan.__main__ import _parser as vqgan_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = sorted(glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True))
#: command name -> the function that parses its argv. Scripts are named by their file, modules by ``-m``,
#: and the console scripts installed by pip share the parsers of the commands they stand for.
PARSERS = {
    'train.py': train.parse_args,
    'validate.py': validate.parse_args,
    'timm_adv.hub': lambda argv: hub_parser().parse_args(argv),
    'timm_adv.vqgan': lambda argv: vqgan_parser().parse_args(argv),
}
CONSOLE_SCRIPTS = {'timm-adv-train': 'train.py', 'timm-adv-validate': 'validate.py', 'timm-adv-hub': 'timm_adv.hub',
                   'timm-adv-vqgan': 'timm_adv.vqgan'}
# datasets whose images and classes differ from a timm model's ImageNet defaults
DATASET_SHAPES = {'torch/cifar10': (10, 32), 'torch/cifar100': (100, 32)}


def _is_python(token):
    return token in ('python', 'python3') or token.endswith('/python')


def find_command(tokens):
    """``(command, argv)`` of one shell command's tokens, or None when it calls none of :data:`PARSERS`."""
    while tokens and re.match(r'^[A-Z_][A-Z0-9_]*=', tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[tokens[0]], tokens[1:]
    if _is_python(tokens[0]) and tokens[1:2] == ['-m']:
        return (tokens[2], tokens[3:]) if tokens[2] in PARSERS else None
    if _is_python(tokens[0]) or tokens[0] == 'torchrun':
        script = next((i for i, t in enumerate(tokens) if os.path.basename(t) in PARSERS), None)
        if script is not None:
            return os.path.basename(tokens[script]), tokens[script + 1:]
    return None


def bash_blocks(path):
    with open(path) as f:
        return re.findall(r'```bash\n(.*?)```', f.read(), re.S)


def file_commands(path):
    """``(command, argv)`` for each call in the bash blocks of ``path`` (torchrun and ``&&`` chains included)."""
    commands = []
    for block in bash_blocks(path):
        for line in block.replace('\\\n', ' ').splitlines():
            for part in line.split('&&'):
                found = find_command(shlex.split(part, comments=True))
                if found is not None:
                    commands.append(found)
    return commands


README_COMMANDS = file_commands(README)
DOC_COMMANDS = [(os.path.relpath(path, REPO), *cmd) for path in DOCS for cmd in file_commands(path)]
ALL_COMMANDS = [('README.md', *cmd) for cmd in README_COMMANDS] + DOC_COMMANDS


def test_commands_are_found_in_readme_and_docs():
    scripts = [s for s, _ in README_COMMANDS]
    assert scripts.count('train.py') >= 5 and scripts.count('validate.py') >= 1, README_COMMANDS
    doc_scripts = [s for _, s, _ in DOC_COMMANDS]
    assert all(doc_scripts.count(s) >= 3 for s in PARSERS), doc_scripts


def test_console_script_spellings_use_the_same_parsers():
    assert find_command(shlex.split('timm-adv-train --adv-method pgd')) == ('train.py', ['--adv-method', 'pgd'])
    assert find_command(shlex.split('OMP_NUM_THREADS=1 timm-adv-validate --knn')) == ('validate.py', ['--knn'])
    assert find_command(shlex.split('python -m timm_adv.vqgan fit')) == ('timm_adv.vqgan', ['fit'])
    assert find_command(shlex.split('timm-adv-hub zoo')) == ('timm_adv.hub', ['zoo'])
    assert find_command(shlex.split('python benchmarks/method_cost.py --model x')) is None


def test_readme_test_command_is_what_ci_runs():
    with open(os.path.join(REPO, '.ci', 'run')) as f:
        ci_command = [line for line in f.read().splitlines() if 'pytest' in line]
    readme_lines = [line for block in bash_blocks(README) for line in block.splitlines()]
    assert len(ci_command) == 1 and ci_command[0] in readme_lines


@pytest.mark.parametrize('source,script,argv', ALL_COMMANDS,
                         ids=[f'{f}: ' + ' '.join([s, *a])[:80] for f, s, a in ALL_COMMANDS])
def test_command_parses(source, script, argv):
    assert '...' not in argv, 'a placeholder is not a command a user can run'
    assert not any('<' in a or '>' in a for a in argv), f'{argv}: write a real path, not a <placeholder>'
    parsed = PARSERS[script](argv)
    args = parsed[0] if isinstance(parsed, tuple) else parsed
    dataset = (getattr(args, 'dataset', '') or '').lower()
    if dataset in DATASET_SHAPES:
        num_classes, size = DATASET_SHAPES[dataset]
        assert args.num_classes == num_classes, f'{dataset} has {num_classes} classes: add --num-classes {num_classes}'
        got = args.img_size or (args.input_size[-1] if args.input_size else None)
        assert got == size, f'{dataset} images are {size} px: add --img-size {size} (or --input-size 3 {size} {size})'

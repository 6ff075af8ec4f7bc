"""Every train.py / validate.py command in the README parses with the scripts' own parsers (none is run)."""
import os
import re
import shlex

import pytest

from timm_adv.cli import train
from timm_adv.cli import validate

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
SCRIPTS = {'train.py': train.parse_args, 'validate.py': validate.parse_args}
# datasets whose images and classes differ from a timm model's ImageNet defaults
DATASET_SHAPES = {'torch/cifar10': (10, 32), 'torch/cifar100': (100, 32)}


def readme_commands():
    """``(script, argv)`` for each train.py / validate.py call in the README's bash blocks (torchrun included)."""
    with open(README) as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    commands = []
    for block in blocks:
        for line in block.replace('\\\n', ' ').splitlines():
            for part in line.split('&&'):
                tokens = shlex.split(part, comments=True)
                script = next((i for i, t in enumerate(tokens) if os.path.basename(t) in SCRIPTS), None)
                if script is not None and tokens[0] in ('python', 'python3', 'torchrun') or (
                        script is not None and tokens[0].endswith('/python')):
                    commands.append((os.path.basename(tokens[script]), tokens[script + 1:]))
    return commands


COMMANDS = readme_commands()


def test_readme_has_commands_of_both_scripts():
    scripts = [s for s, _ in COMMANDS]
    assert scripts.count('train.py') >= 5 and scripts.count('validate.py') >= 3, COMMANDS


@pytest.mark.parametrize('script,argv', COMMANDS, ids=[' '.join([s, *a])[:80] for s, a in COMMANDS])
def test_readme_command_parses(script, argv):
    assert '...' not in argv, 'a placeholder is not a command a user can run'
    parsed = SCRIPTS[script](argv)
    args = parsed[0] if isinstance(parsed, tuple) else parsed
    dataset = (getattr(args, 'dataset', '') or '').lower()
    if dataset in DATASET_SHAPES:
        num_classes, size = DATASET_SHAPES[dataset]
        assert args.num_classes == num_classes, f'{dataset} has {num_classes} classes: add --num-classes {num_classes}'
        got = args.img_size or (args.input_size[-1] if args.input_size else None)
        assert got == size, f'{dataset} images are {size} px: add --img-size {size} (or --input-size 3 {size} {size})'

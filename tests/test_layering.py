"""The package's layering: no module imports a layer above its own.

Layers, lowest first; a module may import its own subpackage and the layers below it, never a
subpackage of its own layer or one above (the building blocks stay independent of each other):

0. ``utils``, ``version``: checkpoints, files, argparse helpers, RNG; torch and timm only.
1. ``attacks``, ``data``, ``layers``, ``loss``, ``models``: the building blocks.
2. ``augment``, ``vqgan``: built from blocks (DAT's augmentation runs an attack, VQGAN fitting reads data).
3. ``evaluation``, ``tasks``: robustness evaluation and the training methods.
4. ``hub``: export, model cards, publishing (reads tasks and evaluation reports).
5. ``timm_adv`` itself (``__init__``): the public names.
6. ``cli``: the command-line programs.

Imports inside functions count as much as those at the top of a module.
"""
import ast
import pathlib
from typing import Iterator, List, Tuple

import timm_adv

LAYERS = (
    ('utils', 'version'),
    ('attacks', 'data', 'layers', 'loss', 'models'),
    ('augment', 'vqgan'),
    ('evaluation', 'tasks'),
    ('hub',),
    ('',),
    ('cli',),
)
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}
PACKAGE_DIR = pathlib.Path(timm_adv.__file__).parent


def _module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
    parts = ('timm_adv',) + path.relative_to(package_dir).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The ``timm_adv`` modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
            package = module.split('.') if is_package else module.split('.')[:-1]
            anchor = '.'.join(package[:len(package) - node.level + 1])
            base = f'{anchor}.{base}' if base else anchor
        if base == 'timm_adv':  # ``from timm_adv import tasks`` names the subpackage
            yield from (f'timm_adv.{a.name}' if a.name in LAYER_OF else base for a in node.names)
        else:
            yield base


def _part(module: str) -> str:
    """The layer-table entry of a module: its subpackage (or top module), '' for the package root."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def upward_imports(package_dir: pathlib.Path = PACKAGE_DIR) -> List[Tuple[str, int, str, str]]:
    """``(module, line, imported module, reason)`` of every import that reaches a layer not below."""
    found = []
    for path in sorted(package_dir.rglob('*.py')):
        module = _module_name(path, package_dir)
        source = _part(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module, path.name == '__init__.py'):
                if target != 'timm_adv' and not target.startswith('timm_adv.'):
                    continue
                dest = _part(target)
                if dest == source:
                    continue
                if source not in LAYER_OF or dest not in LAYER_OF:
                    unknown = source if source not in LAYER_OF else dest
                    found.append((module, node.lineno, target, f'{unknown!r} is in no layer: add it to LAYERS'))
                elif LAYER_OF[dest] >= LAYER_OF[source]:
                    where = 'in the same layer as' if LAYER_OF[dest] == LAYER_OF[source] else 'in a higher layer than'
                    found.append((module, node.lineno, target, f'{dest or "timm_adv"} is {where} '
                                                               f'{source or "timm_adv"}'))
    return found


def test_every_subpackage_has_a_layer():
    parts = {p.name if p.is_dir() else p.stem for p in PACKAGE_DIR.iterdir()
             if (p.is_dir() and (p / '__init__.py').exists()) or (p.suffix == '.py' and p.stem != '__init__')}
    assert parts <= set(LAYER_OF), f'add {sorted(parts - set(LAYER_OF))} to LAYERS in {__file__}'


def test_no_upward_imports():
    found = upward_imports()
    assert not found, 'imports of a layer not below the importing module:\n' + '\n'.join(
        f'  {module}:{line} imports {target} ({reason})' for module, line, target, reason in found)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / 'timm_adv'
    (pkg / 'attacks').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'attacks' / '__init__.py').write_text('from .pgd import run\n')
    (pkg / 'attacks' / 'pgd.py').write_text('def run():\n    from ..tasks import get_method\n'
                                            '    from .. import hub\n')
    found = upward_imports(pkg)
    assert [(m, line, t) for m, line, t, _ in found] == [
        ('timm_adv.attacks.pgd', 2, 'timm_adv.tasks'), ('timm_adv.attacks.pgd', 3, 'timm_adv.hub')]

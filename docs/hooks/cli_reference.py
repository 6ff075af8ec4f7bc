"""MkDocs hook: the CLI reference page, rendered from the commands' own argparse parsers at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with every group, option,
default and help string of each parser in :data:`COMMANDS`, so the page cannot drift from the code. A parser
that cannot be imported fails the build.
"""
import argparse
import html
import importlib
import os
import sys
from typing import Any, Iterator, List, Tuple

#: (command as users type it, module, attribute: a parser or a function returning one). Rows that share a
#: command render as one section (train.py's ``-c`` config parser runs before its main parser).
COMMANDS = [
    ('timm-adv-train', 'timm_adv.cli.train', 'config_parser'),
    ('timm-adv-train', 'timm_adv.cli.train', 'build_parser'),
    ('timm-adv-validate', 'timm_adv.cli.validate', 'build_parser'),
    ('timm-adv-hub', 'timm_adv.hub.__main__', '_parser'),
    ('timm-adv-vqgan', 'timm_adv.vqgan.__main__', '_parser'),
]

MARKER = '<!-- cli-reference -->'
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_parser(module: str, attribute: str) -> argparse.ArgumentParser:
    """Imports ``module`` from the repository root and returns its parser (calling ``attribute`` if needed)."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    obj = getattr(importlib.import_module(module), attribute)
    return obj if isinstance(obj, argparse.ArgumentParser) else obj()


def _cell(text: str) -> str:
    """Escapes ``text`` for a markdown table cell (no HTML, emphasis, links or column breaks); rST-style
    double-backquoted spans, as module docstrings write commands, become code."""
    text = html.escape(' '.join(str(text).split()), quote=False)
    for char, entity in (('|', '&#124;'), ('*', '&#42;'), ('_', '&#95;'), ('[', '&#91;')):
        text = text.replace(char, entity)
    parts = text.split('``')
    parts[1::2] = [f'<code>{part}</code>' for part in parts[1::2]]
    return ''.join(parts).replace('`', '&#96;')


def _option(action: argparse.Action, parser: argparse.ArgumentParser) -> Tuple[str, str, str]:
    """``(flags, default, help)`` cells of one argparse action."""
    if action.option_strings:
        metavar = ''
        if action.nargs != 0:
            metavar = parser._get_formatter()._format_args(action, action.dest.upper())
        flags = ', '.join(action.option_strings) + (f' {metavar}' if metavar else '')
    else:
        flags = action.metavar or action.dest
    if action.choices is not None and action.metavar is not None and not isinstance(action, argparse._SubParsersAction):
        flags += ' {' + ','.join(map(str, action.choices)) + '}'
    default = '' if action.default in (None, argparse.SUPPRESS, '') or action.nargs == 0 else repr(action.default)
    helptext = parser._get_formatter()._expand_help(action) if action.help else ''
    return f'<code>{_cell(flags)}</code>', _cell(default), _cell(helptext)


def _sections(parser: argparse.ArgumentParser, title: str, level: int) -> Iterator[str]:
    """Markdown for one parser: its description, a table per argument group, then each sub-command."""
    if parser.description:
        yield _cell(parser.description) + '\n'
    subparsers: List[argparse._SubParsersAction] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        subparsers += [a for a in actions if isinstance(a, argparse._SubParsersAction)]
        rows = [_option(a, parser) for a in actions if not isinstance(a, argparse._SubParsersAction)]
        if not rows:
            continue
        yield f'{"#" * level} {title}: {group.title}\n'
        yield '| option | default | help |\n|---|---|---|'
        yield from (f'| {flags} | {default} | {helptext} |' for flags, default, helptext in rows)
        yield ''
    for action in subparsers:
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield f'{"#" * level} {title} {name}\n'
            if helps.get(name):
                yield _cell(helps[name]) + '\n'
            yield from _sections(sub, f'{title} {name}', level + 1)


def render_cli_reference() -> str:
    """The generated markdown for every command of :data:`COMMANDS`."""
    lines: List[str] = []
    for command in dict.fromkeys(c for c, _, _ in COMMANDS):
        lines.append(f'## `{command}`\n')
        for _, module, attribute in (row for row in COMMANDS if row[0] == command):
            lines += _sections(load_parser(module, attribute), command, 3)
    return '\n'.join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: fills the CLI page's marker."""
    if MARKER in markdown:
        return markdown.replace(MARKER, render_cli_reference())
    return markdown

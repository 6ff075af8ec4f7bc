"""Command-line helpers: which flags the user actually set, and number types that name their flag.

A flag left at its default and the same value typed explicitly are different requests: only the
second one can be "ignored". The parser is run a second time with every default suppressed, so a
destination appears only when a flag for it was typed (abbreviations and aliases resolved by
argparse itself), never by comparing values with defaults.
"""
import argparse
from typing import Callable, Dict, Mapping, Optional, Sequence

__all__ = ['bounded_type', 'explicit_args', 'flag_name']


def flag_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """The long option of ``dest`` (e.g. ``--batch-size`` for ``batch_size``), or ``dest`` itself."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            if isinstance(action, argparse.BooleanOptionalAction):
                return '/'.join(action.option_strings)  # --flag/--no-flag: either may have been typed
            return max(action.option_strings, key=len)
    return dest


def _same_value(a, b) -> bool:
    # a YAML config turns tuple defaults (e.g. nargs=2 flags) into lists
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def explicit_args(
        parser: argparse.ArgumentParser,
        argv: Optional[Sequence[str]],
        config: Optional[Mapping] = None,
        config_name: str = '-c/--config',
) -> Dict[str, str]:
    """Destinations the user set, mapped to the flag as it should be named in a message.

    Args:
        parser: The parser ``argv`` was parsed with.
        argv: The command-line arguments (None: ``sys.argv[1:]``).
        config: Values from a YAML config (timm's ``-c``); a key counts as set when its value
            differs from the parser's own default (an ``args.yaml`` lists every flag). Call this
            before the config is applied with ``parser.set_defaults``.
        config_name: How to name the config file in messages.

    Returns:
        ``{dest: flag}``, e.g. ``{'adv_clean_weight': '--adv-clean-weight'}``.

    Example:
        >>> explicit_args(parser, ['--adv-method', 'pgd', '-b', '64'])
        {'adv_method': '--adv-method', 'batch_size': '--batch-size'}
    """
    saved_defaults = {id(a): a.default for a in parser._actions}
    saved_parser_defaults = dict(parser._defaults)
    # --help is left to the real parse: its text shows the defaults (``%(default)s``) suppressed here
    helps = {s: a for s, a in parser._option_string_actions.items() if isinstance(a, argparse._HelpAction)}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    for option in helps:
        del parser._option_string_actions[option]
    try:
        typed, _ = parser.parse_known_args(argv, argparse.Namespace())
    finally:
        for action in parser._actions:
            action.default = saved_defaults[id(action)]
        parser._defaults.update(saved_parser_defaults)
        parser._option_string_actions.update(helps)
    explicit = {dest: flag_name(parser, dest) for dest in vars(typed)}
    if config:
        for dest, value in config.items():
            if dest in explicit:
                continue
            action = next((a for a in parser._actions if a.dest == dest), None)
            if action is not None and not _same_value(value, action.default):
                explicit[dest] = f'{flag_name(parser, dest)} (from {config_name})'
    return explicit


def bounded_type(flag: str, cast: type, minimum) -> Callable[[str], float]:
    """Parses ``cast(value)`` and requires it to be ``>= minimum``.

    Example:
        >>> parser.add_argument('--adv-steps', type=bounded_type('--adv-steps', int, 1))
    """
    def _parse(value):
        try:
            out = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{flag} must be a {cast.__name__}, got {value!r}.') from None
        if not out >= minimum:
            raise argparse.ArgumentTypeError(f'{flag} must be >= {minimum}, got {value}.')
        return out
    _parse.__name__ = cast.__name__
    return _parse

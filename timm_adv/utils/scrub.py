"""Keeps secrets and machine details out of the files a run writes and publishes.

Secrets: values of environment variables whose names say they are credentials (``HF_TOKEN``,
``WANDB_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``, ...), strings shaped like well-known
tokens (Hugging Face ``hf_...``, GitHub ``ghp_...``, AWS access key ids), and the value of any
mapping key that names a credential. Machine details: home folders (``/home/<user>``,
``/Users/<user>``, this user's ``~``) and this machine's host name.

Local files (``args.yaml``, checkpoints) drop secrets only, so that ``-c args.yaml`` still finds
the data; exported and published files drop machine details too.

Example:
    >>> scrub({'data_dir': '/home/ana/imagenet', 'hf_token': 'hf_abc...'})
    {'data_dir': '~/imagenet', 'hf_token': '<redacted>'}
"""
import argparse
import os
import re
import socket
from typing import Any, List, Mapping

__all__ = ['REDACTED', 'scrub', 'scrub_text', 'find_leaks']

REDACTED = '<redacted>'
# names that end in a credential word (HF_TOKEN, wandb_api_key), not any name holding one (kd_token_distill_type)
_SECRET_NAME = re.compile(r'(?:^|_)(?:token|secret|passw(?:or)?d|api_?key|access_?key|private_?key|credentials?)$',
                          re.IGNORECASE)
_TOKEN_SHAPES = re.compile(r'\bhf_[A-Za-z0-9]{30,}\b|\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}\b|\bAKIA[0-9A-Z]{16}\b')
_HOME = re.compile(r'(?:/home|/Users)/[^/\s\'"]+')


def _env_secrets() -> List[str]:
    # long values only: a short one ("1", "true") would redact ordinary text
    return sorted((v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8), key=len, reverse=True)


def _machine_patterns() -> List[re.Pattern]:
    patterns = []
    home = os.path.expanduser('~')
    if home not in ('', '/', '~'):
        patterns.append((re.compile(re.escape(home.rstrip('/')) + r'(?=/|\b|$)'), '~'))
    patterns.append((_HOME, '~'))
    host = socket.gethostname()
    if len(host) >= 3:
        for name in {host, host.split('.')[0]} if len(host.split('.')[0]) >= 3 else {host}:
            patterns.append((re.compile(r'(?<![\w.-])' + re.escape(name) + r'(?![\w-])'), '<host>'))
    return patterns


def scrub_text(text: str, machine: bool = True) -> str:
    """``text`` with secrets (and, with ``machine``, home folders and the host name) replaced."""
    for value in _env_secrets():
        text = text.replace(value, REDACTED)
    text = _TOKEN_SHAPES.sub(REDACTED, text)
    if machine:
        for pattern, replacement in _machine_patterns():
            text = pattern.sub(replacement, text)
    return text


def scrub(value: Any, machine: bool = True) -> Any:
    """A copy of ``value`` (strings, mappings, sequences, ``argparse.Namespace``) scrubbed by :func:`scrub_text`;
    a mapping key naming a credential has its value replaced whole."""
    if isinstance(value, str):
        return scrub_text(value, machine)
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**scrub(vars(value), machine))
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) and isinstance(v, str) and v
                else scrub(v, machine) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, machine) for v in value)
    return value


def find_leaks(text: str, machine: bool = True) -> List[str]:
    """What :func:`scrub_text` would remove from ``text`` (kinds, never the secret itself)."""
    leaks = []
    if any(v in text for v in _env_secrets()) or _TOKEN_SHAPES.search(text):
        leaks.append('a token')
    if machine and any(p.search(text) for p, _ in _machine_patterns()):
        leaks.append('a home folder or host name')
    return leaks

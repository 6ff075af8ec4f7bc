"""Griffe extension: our Google-style docstrings title their examples ``Example:`` (timm's spelling).

Griffe's Google parser only knows the plural ``Examples:`` as a code section; anything else with a colon is
an admonition rendered as prose, which would turn ``>>>`` lines into nested quotes. This reads the singular
as the plural, so the API reference shows every example as code.
"""
import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r'^(\s*)Example:\s*$', re.M)


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` section titles to ``Examples:`` before a docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r'\1Examples:', obj.docstring.value)

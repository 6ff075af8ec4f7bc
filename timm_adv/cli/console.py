"""Entry points of the installed commands (``[project.scripts]`` in pyproject.toml).

- ``timm-adv-train``: :func:`timm_adv.cli.train.main`, as ``python train.py`` in a checkout;
- ``timm-adv-validate``: :func:`timm_adv.cli.validate.main`, as ``python validate.py``;
- ``timm-adv-hub``: ``timm_adv.hub.__main__.main``, as ``python -m timm_adv.hub``;
- ``timm-adv-vqgan``: ``timm_adv.vqgan.__main__.main``, as ``python -m timm_adv.vqgan``.

The ``main`` functions return their results (a metrics dict, for tests and notebooks), while the
wrapper pip writes for a console script passes the entry's return value to ``sys.exit``, which would
print a dict and exit 1; so each entry here runs its ``main`` on ``sys.argv`` and returns nothing.
Each imports its program only when called: ``timm-adv-hub --help`` does not import the trainer.

Example:
    >>> from timm_adv.cli import console
    >>> console.train()  # what `timm-adv-train --model resnet10t --epochs 1` runs
"""

__all__ = ['train', 'validate', 'hub', 'vqgan']


def train() -> None:
    """``timm-adv-train``: :func:`timm_adv.cli.train.main` on the command line's arguments."""
    from .train import main
    main()


def validate() -> None:
    """``timm-adv-validate``: :func:`timm_adv.cli.validate.main` on the command line's arguments."""
    from .validate import main
    main()


def hub() -> None:
    """``timm-adv-hub``: ``python -m timm_adv.hub`` (export, import, zoo, publish, cache, compare, pipeline)."""
    from timm_adv.hub.__main__ import main
    main()


def vqgan() -> None:
    """``timm-adv-vqgan``: ``python -m timm_adv.vqgan`` (fit, convert)."""
    from timm_adv.vqgan.__main__ import main
    main()

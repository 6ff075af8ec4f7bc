"""The command-line programs: ``train`` (``timm-adv-train``, ``python train.py``) and ``validate``
(``timm-adv-validate``, ``python validate.py``); ``console`` holds the installed commands' entry points.

Each program module exposes ``build_parser()``, ``parse_args(argv=None)`` and ``main(argv=None)``. This
package imports nothing itself, so ``from timm_adv.cli import train`` loads one program only.
"""

#!/usr/bin/env python3
"""``python validate.py ...``: timm-adv validation from a checkout (installed: ``timm-adv-validate``).

The program is :mod:`timm_adv.cli.validate`; this file only runs its ``main``.
"""
from timm_adv.cli.validate import main

if __name__ == '__main__':
    main()

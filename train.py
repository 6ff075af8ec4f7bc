#!/usr/bin/env python3
"""``python train.py ...``: timm-adv training from a checkout (installed: ``timm-adv-train``).

The program is :mod:`timm_adv.cli.train`; this file only runs its ``main``.
"""
from timm_adv.cli.train import main

if __name__ == '__main__':
    main()

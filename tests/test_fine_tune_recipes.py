"""Fine-tuning methods get fine-tuning defaults from the bundled recipe, printed like the other recipe lines.

The accuracy each obvious command keeps is measured end to end by ``benchmarks/fine_tune_recipes.py``
(minutes of training: too long for the suite).
"""
import logging

import pytest

from timm_adv.cli import train

FROM_SCRATCH = dict(epochs=10, lr=0.05, weight_decay=5e-4)
FINE_TUNE = dict(epochs=2, lr=0.01, weight_decay=1e-4, opt='sgd')
# the official notebook's stage-2 optimiser
SSAT_STAGE2 = dict(epochs=2, lr=1e-4, weight_decay=1e-5, opt='adam', opt_betas=[0.8, 0.999])


def _parse(argv, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='train'):
        args, _ = train.parse_args(argv)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith('recipe for bundled/mnist'))
    return args, line


@pytest.mark.parametrize('argv, expected', [
    (['--adv-method', 'advbn', '--initial-checkpoint', 'plain/last.pth.tar'], FINE_TUNE),
    (['--adv-method', 'advbn'], FINE_TUNE),  # AdvBN always fine-tunes (a warning asks for the checkpoint)
    (['--adv-method', 'advprop', '--initial-checkpoint', 'plain/last.pth.tar'], FINE_TUNE),
    (['--adv-method', 'pgd', '--pretrained', '--pretrained-path', 'mae_pretrain.pth'], FINE_TUNE),  # an MAE encoder
    (['--adv-method', 'ssat', '--pretrained', '--pretrained-path', 'stage1/last.pth.tar'], SSAT_STAGE2),
    (['--adv-method', 'advprop'], FROM_SCRATCH),
    (['--adv-method', 'contrastive'], FROM_SCRATCH),
])
def test_obvious_command_gets_fine_tuning_defaults_when_it_fine_tunes(argv, expected, caplog):
    args, line = _parse(argv, caplog)
    assert {k: getattr(args, k) for k in expected} == expected
    fine_tuning = expected is not FROM_SCRATCH
    assert line.startswith('recipe for bundled/mnist (fine-tuning):' if fine_tuning else 'recipe for bundled/mnist:')
    assert f'--epochs {expected["epochs"]}' in line and f'--lr {expected["lr"]:g}' in line


def test_typed_flags_still_win_when_fine_tuning(caplog):
    args, line = _parse(['--adv-method', 'advbn', '--initial-checkpoint', 'x', '--lr', '0.003', '--epochs', '5'],
                        caplog)
    assert (args.lr, args.epochs, args.weight_decay) == (0.003, 5, 1e-4)
    assert '--lr' not in line and '--epochs' not in line
    args, _ = _parse(['--adv-method', 'ssat', '--opt', 'sgd', '--lr', '0.01'], caplog)
    assert (args.opt, args.lr, args.weight_decay) == ('sgd', 0.01, 1e-5)


#: The official notebook's stage 2 (STL_SAT_003.ipynb), as train.py flags.
NOTEBOOK_STAGE2 = dict(
    dataset='torch/stl10', adv_method='ssat', adv_eps=0.03, adv_steps=10, adv_step_size=0.005, adv_ssat_guides=300,
    adv_knn_k=75, epochs=10, batch_size=100, opt='adam', lr=1e-4, opt_betas=[0.8, 0.999], opt_eps=1e-8,
    weight_decay=1e-5, opt_kwargs={'filter_bias_and_bn': False}, decay_rate=1.0, warmup_epochs=0, no_aug=True,
)


def test_stage2_recipe_file_is_the_notebooks_run(repo_root):
    import os
    args, _ = train.parse_args(['-c', os.path.join(repo_root, 'recipes', 'ssat_stage2_stl10.yaml'), '--data-dir', '/x',
                                '--model', 'resnet18', '--pretrained', '--pretrained-path', 'stage1.pth'])
    assert {k: getattr(args, k) for k in NOTEBOOK_STAGE2} == NOTEBOOK_STAGE2

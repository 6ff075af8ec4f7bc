"""Dataset recipes: applied to flags the user did not give (command line or -c), printed at start-up."""
import logging

import pytest
import yaml

from timm_adv.cli import train
from timm_adv.data import apply_dataset_recipe, available_cpus, default_workers, format_recipe
from timm_adv.utils import explicit_args


def _parse(*argv):
    return train.parse_args(list(argv))[0]


def test_explicit_args_counts_typed_flags_even_at_their_default():
    parser = train.build_parser()
    # -b 128, --smoothing 0.1 and --adv-method none are timm / timm-adv defaults, typed on purpose
    given = set(explicit_args(parser, ['-b', '128', '--smoothing', '0.1', '--adv-method', 'none', '--no-aug']))
    assert given == {'batch_size', 'smoothing', 'adv_method', 'no_aug'}
    assert explicit_args(parser, []) == {}
    assert set(explicit_args(parser, ['/data/imagenet'])) == {'data'}


def test_bare_command_takes_the_bundled_recipe(caplog):
    with caplog.at_level(logging.INFO, logger='train'):
        args = _parse()
    assert (args.no_aug, args.epochs, args.warmup_epochs, args.batch_size, args.lr, args.workers) == (
        True, 10, 0, 64, 0.05, 0)
    assert args.smoothing == 0.0  # timm's 0.1 masks gradients under PGD-AT
    assert args.adv_steps is None  # attack settings only for the method that has them in the recipe
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith('recipe for bundled/mnist:'))
    assert '--no-aug' in line and '--batch-size 64' in line and '--epochs 10' in line


def test_typed_flags_win_over_the_recipe_even_at_timm_defaults():
    args = _parse('-b', '128', '--epochs', '300', '--warmup-epochs', '5', '--adv-method', 'pgd', '--adv-steps', '10')
    assert (args.batch_size, args.epochs, args.warmup_epochs, args.adv_steps) == (128, 300, 5, 10)
    assert args.adv_step_size is None  # the recipe's step size belongs to its step count
    assert args.lr == 0.05  # flags not typed still come from the recipe


def test_an_augmentation_flag_turns_on_augmentation_that_keeps_digits_digits():
    args = _parse('--scale', '0.8', '1')
    assert not args.no_aug and args.scale == [0.8, 1.0]
    assert (args.hflip, args.color_jitter, args.ratio, args.train_interpolation) == (0.0, 0.0, [1.0, 1.0], 'bilinear')
    args = _parse('--hflip', '0.5')  # typed: even a flip
    assert not args.no_aug and args.hflip == 0.5 and args.scale == [1.0, 1.0]


def test_recipe_items_that_depend_on_other_flags():
    args = _parse('--adv-method', 'pgd', '--adv-eps', '0.2')
    assert (args.adv_steps, args.adv_step_size) == (5, pytest.approx(0.05))  # a quarter of eps
    assert _parse('--adv-method', 'pgd').adv_step_size is None  # no eps given: the method's defaults
    assert _parse('--adv-method', 'pgd', '--adv-step-size', '0.02').adv_steps is None
    assert _parse('--adv-method', 'fgsm-rs', '--adv-eps', '0.1').adv_steps is None
    # the recipe's SGD learning rate is not forced on another optimiser or on a --lr-base rule
    assert _parse('--opt', 'adamw').lr is None
    assert _parse('--lr-base', '0.2').lr is None


def _effective(args):
    skip = {'log_interval', 'output', 'experiment', 'adv_val_eps'}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out['val_eps'] = args.adv_val_eps or args.adv_eps
    return out


@pytest.mark.parametrize('name,user', [
    ('pgd-at', ['--adv-method', 'pgd', '--adv-eps', '0.1']),
    ('plain', ['--adv-method', 'none']),
])
def test_short_commands_train_exactly_what_the_demo_trains(name, user):
    """The issue's command takes the demo's recipe flag for flag, so the demo's figures and time are its own."""
    import demo
    demo_args = _parse(*demo.COMMON, *demo.METHODS[name], '--epochs', str(demo.EPOCHS))
    user_args = _parse(*user)
    if name == 'plain':  # the demo attacks its plain model at the PGD-AT eps
        user_args.adv_val_eps = 0.1
    assert _effective(user_args) == _effective(demo_args)


def test_no_recipe_for_user_data():
    args = _parse('--data-dir', '/data/imagenet')
    assert (args.batch_size, args.epochs, args.hflip, args.scale, args.no_aug) == (128, 300, 0.5, [0.08, 1.0], False)
    assert apply_dataset_recipe(args, set()) is None


def test_config_file_keys_count_as_given(tmp_path, caplog):
    (tmp_path / 'cfg.yaml').write_text(yaml.safe_dump({'batch_size': 128, 'hflip': 0.5}))
    args = _parse('-c', str(tmp_path / 'cfg.yaml'), '--epochs', '3')
    assert (args.batch_size, args.hflip, args.epochs, args.warmup_epochs) == (128, 0.5, 3, 0)


def test_format_recipe_writes_flags():
    line = format_recipe('bundled/mnist', {'no_aug': True, 'batch_size': 64, 'scale': [1.0, 1.0], 'weight_decay': 5e-4})
    assert line == ('recipe for bundled/mnist: --no-aug, --batch-size 64, --scale 1 1, --weight-decay 0.0005 '
                    '(flags you give win)')
    assert 'nothing applied' in format_recipe('bundled/mnist', {})


def test_workers_default_never_exceeds_available_cpus(monkeypatch):
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1}, raising=False)
    assert available_cpus() == 2
    assert default_workers(4) == 2 and default_workers(1) == 1
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun: the CPUs are shared by the local processes
    assert default_workers(4) == 1
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert default_workers(4) == 0
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    assert _parse('--data-dir', '/data/imagenet').workers == 2


def test_recipe_run_records_its_values_and_learns(tmp_path):
    metrics = train.main(['--model', 'test_resnet', '--epochs', '1', '--adv-val-samples', '50', '--log-interval', '1000',
                          '--output', str(tmp_path), '--experiment', 'recipe'])
    saved = yaml.safe_load((tmp_path / 'recipe' / 'args.yaml').read_text())
    assert (saved['batch_size'], saved['lr'], saved['no_aug'], saved['workers']) == (64, 0.05, True, 0)
    # one epoch of the digit recipe reaches 75% with test_resnet; timm's ImageNet defaults give 12%
    assert metrics['top1'] >= 60.0

"""train.py against timm's train.py: every flag, a real timm args.yaml, and the added flags at work."""
import csv
import logging
import os
import sys
import types

import pytest
import torch
import yaml
from timm.layers import SplitBatchNorm2d
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy

from timm_adv.cli import train
from timm_adv.utils import split_config_keys

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TINY = ['--model', 'test_resnet', '-b', '16', '--workers', '0', '--log-interval', '1000', '--epochs', '1',
        '--warmup-epochs', '0', '--lr', '0.05', '--train-num-samples', '32', '--val-num-samples', '16',
        '--adv-val-samples', '8']
PGD1 = ['--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1']


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module recording ``init`` and ``log`` calls."""
    calls = {'init': [], 'log': [], 'finish': 0}

    class Run:
        def log(self, row, step=None):
            calls['log'].append((step, dict(row)))

        def finish(self):
            calls['finish'] += 1

    def init(**kwargs):
        calls['init'].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, 'wandb', types.SimpleNamespace(init=init))
    return calls


def _setup(tmp_path, *argv):
    args, _ = train.parse_args([*TINY, '--output', str(tmp_path), *argv])
    return args, train.setup(args)


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_parser_takes_every_timm_train_flag():
    with open(os.path.join(DATA, 'timm_train_flags.txt')) as f:
        timm_flags = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    ours = set()
    for action in train.build_parser()._actions:
        ours.update(action.option_strings or [action.dest])
    ours.update(train.config_parser._option_string_actions)
    missing = [flag for flag in timm_flags if flag not in ours]
    assert not missing, f'timm train.py flags our train.py lacks: {missing}'
    assert len(timm_flags) == 179


def test_timm_args_yaml_loads_with_every_key(fake_wandb):
    path = os.path.join(DATA, 'timm_args.yaml')
    with open(path) as f:
        cfg = yaml.safe_load(f)
    known = {a.dest for a in train.build_parser()._actions}
    dropped = sorted(set(cfg) - known)
    assert not dropped, f'keys of a timm args.yaml our train.py has no flag for: {dropped}'
    args, _ = train.parse_args(['-c', path])
    changed = {k: (v, getattr(args, k)) for k, v in cfg.items()
               if (list(v) if isinstance(v, tuple) else v) != (list(getattr(args, k)) if isinstance(
                   getattr(args, k), tuple) else getattr(args, k))}
    assert not changed, f'keys whose value changed on loading (timm, ours): {changed}'


def test_split_config_keys_skips_only_runtime_and_unset_keys():
    usable, skipped, refused = split_config_keys(
        {'lr': 0.1, 'rank': 2, 'world_size': 8, 'old_flag': False, 'other': None, 'new_recipe': 0.5}, {'lr'})
    assert usable == {'lr': 0.1}
    assert skipped == ['old_flag', 'other', 'rank', 'world_size'] and refused == ['new_recipe']


@pytest.mark.parametrize('argv,message', [
    (['--aug-splits', '3', *PGD1], '--aug-splits with --adv-method pgd'),
    (['--aug-splits', '3', '--split-bn', '--adv-method', 'advprop'], '--aug-splits --split-bn with --adv-method advprop'),
    (['--aug-splits', '1'], '--aug-splits 1'),
    (['--jsd-loss'], '--jsd-loss is a consistency loss between AugMix splits'),
    (['--aug-splits', '3', '--no-prefetcher'], 'drop --no-prefetcher'),
    (['--aug-splits', '3', '--mixup', '0.2'], '--mixup/--cutmix with --aug-splits'),
    (['--split-bn'], '--split-bn keeps BN statistics per AugMix split'),
    (['--bce-sum'], '--bce-sum does nothing without --bce-loss'),
    (['--layer-decay-min-scale', '0.1'], '--layer-decay-min-scale does nothing without --layer-decay'),
    (['--lr-noise-std', '2'], '--lr-noise-std does nothing without --lr-noise'),
    (['--wandb-tags', 'a'], '--wandb-tags does nothing without --log-wandb'),
    (['--train-size-schedule', 'progressive'], '--train-size-schedule does nothing without --train-img-sizes'),
    (['--naflex-loader'], 'NaFlex batches are patch dictionaries'),
    (['--naflex-max-seq-len', '256'], '--naflex-max-seq-len does nothing without --naflex-loader'),
    (['--tta', '2'], '--tta 2'),
    (['--model-dtype', 'bfloat16', '--amp'], 'AMP needs float32 weights'),
    (['--model-dtype', 'int8'], "--model-dtype 'int8'"),
    (['--fuser', 'te'], '--fuser does nothing without --torchscript'),
    (['--fuser', 'nvfuser', '--torchscript'], 'torch no longer has nvfuser'),
    (['--epoch-repeats', '2'], '--epoch-repeats 2 only repeats streaming datasets'),
    (['--input-key', 'img'], '--input-key: the bundled dataset'),
    (['--val-interval', '0'], '--val-interval must be >= 1'),
    (['--train-num-samples', '0'], '--train-num-samples must be >= 1'),
    (['--drop-connect', '0.1', '--drop-path', '0.1'], '--drop-connect is the deprecated name of --drop-path'),
])
def test_refused_flags_and_combinations_fail_early(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_log_wandb_without_the_package_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb -> ImportError
    with pytest.raises(SystemExit):
        train.parse_args(['--log-wandb'])
    assert "pip install 'timm-adv[wandb]'" in capsys.readouterr().err


def test_bce_loss_trains_under_attack_on_a_subset(tmp_path):
    args, state = _setup(tmp_path, '--experiment', 'bce', '--bce-loss', '--bce-target-thresh', '0.2',
                         '--bce-pos-weight', '2', '--smoothing', '0', *PGD1)
    criterion = state.task.criterion
    assert isinstance(criterion, BinaryCrossEntropy)  # timm's script would fall back to CE at --smoothing 0
    assert criterion.target_threshold == 0.2 and float(criterion.pos_weight) == 2.0
    assert len(state.loaders.train.dataset) == 32 and len(state.loaders.eval.dataset) == 16
    metrics = train.train(args, state)
    row = _summary(tmp_path / 'bce' / 'summary.csv')[0]
    assert float(row['train_top1_adv']) >= 0 and 'pgd_top1' in metrics


def test_augmix_jsd_split_bn_without_attack(tmp_path):
    args, state = _setup(tmp_path, '--experiment', 'augmix', '--aug-splits', '3', '--jsd-loss', '--split-bn',
                         '--aa', 'augmix-m1-w1', '--reprob', '0.25', '--resplit')
    task = state.task
    assert isinstance(task.criterion, JsdCrossEntropy) and task.criterion.num_splits == 3
    bns = [m for m in task.unwrapped_model.modules() if isinstance(m, SplitBatchNorm2d)]
    assert bns and all(m.num_splits == 3 for m in bns)
    input, target = next(iter(state.loaders.train))
    assert input.shape[0] == 3 * 16 and torch.equal(target[:16], target[16:32])  # clean + 2 AugMix views
    train.train(args, state)
    assert len(_summary(tmp_path / 'augmix' / 'summary.csv')) == 1


def test_val_interval_recovery_interval_and_save_images(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train.main([*TINY, '--output', str(tmp_path), '--experiment', 'vi', '--epochs', '2', '--val-interval', '2',
                    '--recovery-interval', '1', '--save-images', '--log-interval', '1'])
    out = tmp_path / 'vi'
    assert [r['epoch'] for r in _summary(out / 'summary.csv')] == ['1']  # epoch 0 not validated
    names = os.listdir(out)
    assert 'checkpoint-1.pth.tar' in names and 'checkpoint-0.pth.tar' not in names
    assert 'Recovery checkpoint: epoch 0, 1 batches done' in caplog.text and 'train-batch-0.jpg' in names
    assert not any(n.startswith('recovery-') for n in names)  # superseded by checkpoint-1, then removed


def test_layer_decay_min_and_no_opt_scales(tmp_path):
    common = ['--model', 'test_vit', '--img-size', '32', '--opt', 'adamw', '--layer-decay', '0.5']
    _, plain = _setup(tmp_path, '--experiment', 'ld', *common)
    _, clamped = _setup(tmp_path, '--experiment', 'ld2', *common, '--layer-decay-min-scale', '0.3',
                        '--layer-decay-no-opt-scale', '0.2')

    def scales(state):
        return {g['lr_scale'] for g in state.optimizer.param_groups}
    assert min(scales(plain)) < 0.2
    assert min(scales(clamped)) == pytest.approx(0.3)  # clamped up, so nothing fell under the no-opt scale
    _, frozen = _setup(tmp_path, '--experiment', 'ld3', *common, '--layer-decay-no-opt-scale', '0.2')
    assert min(scales(frozen)) >= 0.2
    assert any(not p.requires_grad for p in frozen.task.unwrapped_model.parameters())


def test_model_dtype_torchscript_and_drop_connect(tmp_path):
    args, state = _setup(tmp_path, '--experiment', 'bf16', '--model-dtype', 'bfloat16', '--torchscript',
                         '--drop-connect', '0.1', *PGD1)
    assert args.drop_path == 0.1
    model = state.task.unwrapped_model
    assert isinstance(model, torch.jit.ScriptModule)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(iter(state.loaders.train))[0].dtype == torch.bfloat16
    assert 'pgd_top1' in train.train(args, state)  # the attack backpropagates through the scripted bf16 model


def test_scheduled_sizes_and_augmentation_flags_reach_timm_loader(tmp_path):
    (tmp_path / 'aug.yaml').write_text('no_aug: false\n')  # given, so the bundled recipe's --no-aug stays off
    args, state = _setup(tmp_path, '-c', str(tmp_path / 'aug.yaml'), '--experiment', 'vr', '--train-img-sizes', '24', '32', '--train-batch-sizes', '16',
                         '8', '--variable-batch-loss-scale', 'sqrt', '--grayscale-prob', '0.5',
                         '--gaussian-blur-prob', '0.5', '--color-jitter-prob', '0.5')
    sizes = {tuple(input.shape[-2:]) + (input.shape[0],) for input, _ in state.loaders.train}
    assert sizes <= {(24, 24, 16), (32, 32, 8)} and len(sizes) == 2
    assert state.loaders.batch_size_reference == pytest.approx(12.0)
    assert train._batch_loss_scale(args, 8, state.loaders.batch_size_reference) == pytest.approx((8 / 12) ** 0.5)
    transforms = repr(state.loaders.train.dataset.transforms[0])
    assert 'RandomGrayscale' in transforms and 'GaussianBlur' in transforms


def test_log_wandb_rows_hold_clean_adversarial_guard_and_cost(tmp_path, fake_wandb):
    train.main([*TINY, '--output', str(tmp_path), '--experiment', 'wb', *PGD1, '--adv-co-guard', '--log-wandb',
                '--wandb-project', 'adv', '--wandb-tags', 't1', 't2'])
    init, = fake_wandb['init']
    assert init['project'] == 'adv' and init['tags'] == ['t1', 't2'] and init['name'] == 'wb'
    assert init['config']['adv_method'] == 'pgd'
    (step, row), = fake_wandb['log']
    assert step == 0 and fake_wandb['finish'] == 1
    for key in ('train_loss', 'train_top1_adv', 'eval_top1', 'eval_pgd_top1', 'eval_guard_pgd_top1',
                'eval_guard_fgsm_top1', 'cost_update_s', 'cost_sample_ms', 'lr'):
        assert key in row, key
    assert row['cost_update_s'] > 0
    csv_row = _summary(tmp_path / 'wb' / 'summary.csv')[0]
    assert not any(k.startswith('cost_') for k in csv_row)  # summary.csv unchanged by the flag


def test_device_modules_are_imported_and_a_missing_one_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, '--output', str(tmp_path), '--experiment', 'dm', '--device-modules', 'no_such_backend'])
    assert e.value.code == 2 and '--device-modules no_such_backend: cannot import it' in capsys.readouterr().err
    assert not (tmp_path / 'dm').exists()

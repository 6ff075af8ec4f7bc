"""train.py with --adv-method none behaves as timm's train.py: EMA selection, loader epochs, optimisers, logs."""
import argparse
import csv
import logging
import re
from collections import OrderedDict

import torch

from timm_adv.cli import train

TINY = ['--model', 'test_resnet', '-b', '16', '--workers', '0', '--log-interval', '1000', '--epochs', '1',
        '--warmup-epochs', '0', '--lr', '0.05', '--train-num-samples', '32', '--val-num-samples', '16',
        '--adv-val-samples', '0']


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _best_epoch(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)['epoch']


def test_plain_run_on_a_folder_writes_timms_summary_columns(tmp_path, image_folder):
    train.main(['--data-dir', str(image_folder), '--model', 'test_resnet', '--img-size', '32', '-b', '8',
                '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--log-interval', '1000',
                '--output', str(tmp_path), '--experiment', 'plain'])
    rows = _summary(tmp_path / 'plain' / 'summary.csv')
    # timm's columns, in timm's order: no train_top1 / epoch time, and no PGD validation for plain training
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']


def test_ema_metrics_replace_the_models_and_choose_model_best(tmp_path, monkeypatch):
    # the model improves every epoch, its EMA gets worse: timm ranks (and writes) the EMA's numbers
    top1 = {False: iter([10.0, 20.0, 30.0]), True: iter([50.0, 40.0, 30.0])}

    def fake_validate_epoch(task, loader_eval, loader_robust, val_attack, args, device, amp_autocast=None, ema=False):
        return OrderedDict(loss=1.0, top1=next(top1[ema]), top5=100.0)

    monkeypatch.setattr(train, 'validate_epoch', fake_validate_epoch)
    train.main([*TINY, '--epochs', '3', '--model-ema', '--output', str(tmp_path), '--experiment', 'ema'])
    rows = _summary(tmp_path / 'ema' / 'summary.csv')
    assert [float(r['eval_top1']) for r in rows] == [50.0, 40.0, 30.0]
    assert not [c for c in rows[0] if 'ema' in c]
    assert _best_epoch(tmp_path / 'ema' / 'model_best.pth.tar') == 0


def test_loader_epoch_reaches_the_scheduled_batch_sampler(tmp_path, monkeypatch):
    seen = []
    real = train.train_one_epoch

    def recording(epoch, task, loader, *a, **k):
        seen.append(loader.batch_sampler.epoch)
        return real(epoch, task, loader, *a, **k)

    monkeypatch.setattr(train, 'train_one_epoch', recording)
    (tmp_path / 'aug.yaml').write_text('no_aug: false\n')
    train.main([*TINY, '-c', str(tmp_path / 'aug.yaml'), '--epochs', '3', '--train-img-sizes', '24', '32',
                '--train-batch-sizes', '16', '8', '--train-size-schedule', 'progressive',
                '--output', str(tmp_path), '--experiment', 'prog'])
    assert seen == [0, 1, 2]  # the progressive schedule advances (timm sets the epoch on every rank)


def test_lookahead_weights_are_synced_before_validation_and_saving(tmp_path, monkeypatch):
    synced = []
    real = train.validate_epoch

    def checking(task, *a, **k):
        optimizer = state.optimizer._base_optimizer
        model = task.unwrapped_model
        synced.append(all(torch.equal(p, optimizer.state[p]['lookahead_slow_buff'])
                          for p in model.parameters() if 'lookahead_slow_buff' in optimizer.state[p]))
        return real(task, *a, **k)

    monkeypatch.setattr(train, 'validate_epoch', checking)
    # 8 updates: the slow weights were last updated at step 6, so the fast weights moved on since
    args, _ = train.parse_args([*TINY, '-b', '4', '--opt', 'lookahead_sgd', '--output', str(tmp_path),
                                '--experiment', 'la'])
    state = train.setup(args)
    train.train(args, state)
    assert synced == [True]
    assert any(state.optimizer._base_optimizer.state[p].get('lookahead_slow_buff') is not None
               for p in state.task.unwrapped_model.parameters())


def test_second_order_optimizer_trains(tmp_path):
    metrics = train.main([*TINY, '--opt', 'adahessian', '--lr', '0.01', '--output', str(tmp_path),
                          '--experiment', 'ah'])  # needs create_graph=True on backward
    assert metrics['loss'] == metrics['loss']


def test_log_lr_is_the_mean_over_param_groups(tmp_path, caplog):
    args, _ = train.parse_args([*TINY, '--model', 'test_vit', '--img-size', '32', '--opt', 'adamw',
                                '--layer-decay', '0.5', '--log-interval', '1', '--output', str(tmp_path),
                                '--experiment', 'lr'])
    state = train.setup(args)
    lrs = [g['lr'] for g in state.optimizer.param_groups]
    with caplog.at_level(logging.INFO, logger='train'):
        train.train(args, state)
    logged = re.findall(r'LR: (\S+)', caplog.text)
    assert logged and logged[0] == f'{sum(lrs) / len(lrs):.3e}' != f'{max(lrs):.3e}'


def test_cuda_speed_defaults_as_timm(tmp_path, monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    args, _ = train.parse_args([*TINY, '--device', 'cpu', '--output', str(tmp_path)])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
        train.setup_device(args)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = before


def test_validate_without_checkpoint_evaluates_the_pretrained_weights(tmp_path, monkeypatch):
    # timm's validate.py: no --checkpoint means pretrained; here from an offline Hub cache
    import timm
    from timm_adv.cli import validate
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from timm_adv.hub import populate_hf_cache
    torch.manual_seed(3)
    weights = timm.create_model('test_resnet').state_dict()
    (tmp_path / 'export').mkdir()
    save_file(weights, str(tmp_path / 'export' / 'model.safetensors'))
    populate_hf_cache(str(tmp_path / 'export'), 'timm/test_resnet.r160_in1k', str(tmp_path / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))

    def weights_of(*argv):
        base = validate.create_eval_model(validate.parse_args(['--model', 'test_resnet.r160_in1k', *argv]),
                                          torch.device('cpu'))[1]
        return base.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in weights_of().items())
    assert not torch.equal(weights_of('--no-pretrained')['fc.weight'], weights['fc.weight'])  # said explicitly


def test_random_state_round_trips_through_a_weights_only_checkpoint():
    import io
    import random

    import numpy as np
    from timm_adv.utils import get_rng_state, set_rng_state

    buffer = io.BytesIO()
    torch.save({'saver': {'rng_states': [get_rng_state()]}}, buffer)
    first = random.random(), float(np.random.rand()), torch.rand(3)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)['saver']['rng_states'][0])
    again = random.random(), float(np.random.rand()), torch.rand(3)
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])

"""train.py end to end on the bundled digits: learning, exact resume, DDP, configs and bad input."""
import csv
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from timm_adv.cli import train
from conftest import run_killed_and_resumed

FAST = ['--model', 'test_resnet', '--no-aug', '-b', '64', '--lr', '0.1', '--warmup-epochs', '0', '--workers', '0',
        '--smoothing', '0', '--log-interval', '1000', '--adv-val-samples', '100']


def _run(tmp_path, name, *extra):
    return train.main([*FAST, '--output', str(tmp_path), '--experiment', name, *extra])


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _load(path):
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def test_plain_training_learns_bundled_digits(tmp_path):
    metrics = _run(tmp_path, 'plain', '--epochs', '3')
    assert metrics['top1'] >= 90.0
    out = tmp_path / 'plain'
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'):
        assert (out / name).exists(), name
    rows = _summary(out / 'summary.csv')
    assert len(rows) == 3 and {'eval_top1', 'eval_pgd_top1', 'train_loss'} <= set(rows[0])


def test_pgd_training_reports_adversarial_metrics(tmp_path):
    _run(tmp_path, 'pgd', '--epochs', '1', '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '2',
         '--adv-clean-weight', '0.5')
    row = _summary(tmp_path / 'pgd' / 'summary.csv')[0]
    assert {'train_top1_adv', 'train_top1_clean', 'train_loss_adv', 'train_loss_clean'} <= set(row)
    assert float(row['train_loss_adv']) > float(row['train_loss_clean'])  # the attack makes the batch harder


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    args = ['--epochs', '2', '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1']
    run_killed_and_resumed(lambda name, *a: _run(tmp_path, name, *a), tmp_path, monkeypatch, args)

    full, resumed = _load(tmp_path / 'full' / 'last.pth.tar'), _load(tmp_path / 'killed' / 'last.pth.tar')
    assert full['epoch'] == resumed['epoch'] == 1
    for k, v in full['state_dict'].items():
        assert torch.equal(v, resumed['state_dict'][k]), k
    for s_full, s_res in zip(full['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(s_full['momentum_buffer'], s_res['momentum_buffer'])
    rows_full, rows_res = _summary(tmp_path / 'full' / 'summary.csv'), _summary(tmp_path / 'killed' / 'summary.csv')
    assert len(rows_res) == 2 and rows_full[1]['eval_top1'] == rows_res[1]['eval_top1']


def test_config_file_reuses_args_yaml(tmp_path, caplog):
    _run(tmp_path, 'first', '--epochs', '1', '--adv-method', 'pgd', '--adv-eps', '0.05', '--adv-steps', '1')
    cfg = yaml.safe_load((tmp_path / 'first' / 'args.yaml').read_text())
    cfg['experiment'] = 'second'
    cfg['some_timm_only_flag'] = None  # an unknown key left unset cannot change the recipe: skipped, said so
    (tmp_path / 'cfg.yaml').write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.INFO):
        train.main(['-c', str(tmp_path / 'cfg.yaml')])
    second = yaml.safe_load((tmp_path / 'second' / 'args.yaml').read_text())
    assert second['adv_method'] == 'pgd' and second['adv_eps'] == pytest.approx(0.05)
    assert 'some_timm_only_flag' in caplog.text


def test_config_file_refuses_unknown_recipe_keys(tmp_path, capsys):
    (tmp_path / 'cfg.yaml').write_text(yaml.safe_dump({'epochs': 1, 'some_timm_only_flag': 1, 'rank': 3}))
    with pytest.raises(SystemExit) as e:
        train.parse_args(['-c', str(tmp_path / 'cfg.yaml')])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'some_timm_only_flag=1' in err and 'rank=3' not in err  # run-time keys are not a recipe


@pytest.mark.parametrize('argv,message', [
    (['--adv-eps', '-1'], '--adv-eps must be > 0'),
    (['--adv-eps', '0'], '--adv-eps must be > 0'),
    (['--adv-steps', '0'], '--adv-steps must be >= 1'),
    (['--adv-method', 'nope'], "Unknown --adv-method 'nope'"),
    (['--no-such-flag'], 'unrecognized arguments: --no-such-flag'),
    (['--data-dir', '/nonexistent/data'], "--data-dir '/nonexistent/data' does not exist"),
    (['--resume', '/nonexistent/last.pth.tar'], "--resume '/nonexistent/last.pth.tar': no such file"),
    (['--adv-clean-weight', '2'], '--adv-clean-weight must be in [0, 1]'),
])
def test_bad_input_fails_early_with_clear_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, 'bad', '--epochs', '1', '--adv-method', 'pgd', *argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, capsys):
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(b'not a checkpoint' * 10)
    with pytest.raises(SystemExit):
        _run(tmp_path, 'a', '--epochs', '1', '--resume', str(corrupt))
    assert 'cannot read this checkpoint' in capsys.readouterr().err

    _run(tmp_path, 'small', '--epochs', '1', '--adv-val-samples', '0')
    with pytest.raises(SystemExit):
        _run(tmp_path, 'b', '--epochs', '2', '--model', 'resnet10t', '--resume', str(tmp_path / 'small' / 'last.pth.tar'))
    err = capsys.readouterr().err
    assert 'does not fit this model' in err and "saved for 'test_resnet'" in err


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    _run(tmp_path, 'run', '--epochs', '1', '--adv-val-samples', '0')
    before = (tmp_path / 'run' / 'last.pth.tar').read_bytes()
    with pytest.raises(SystemExit):
        _run(tmp_path, 'run', '--epochs', '1', '--adv-val-samples', '0')
    assert 'already holds a run' in capsys.readouterr().err
    assert (tmp_path / 'run' / 'last.pth.tar').read_bytes() == before


def test_torchrun_two_process_cpu(tmp_path, repo_root):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
           os.path.join(repo_root, 'train.py'), *FAST, '--epochs', '1', '--adv-method', 'pgd', '--adv-steps', '1',
           '--adv-eps', '0.1', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'distributed mode, process 1/2' in proc.stderr
    rows = _summary(tmp_path / 'ddp' / 'summary.csv')
    assert len(rows) == 1 and float(rows[0]['eval_top1']) > 10.0

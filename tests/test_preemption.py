"""Preemption: a signal mid-epoch writes a recovery checkpoint and exits restartably; ``--resume auto``
continues at the next batch, bitwise equal to an uninterrupted run (CPU)."""
import argparse
import os
import signal

import pytest
import torch

import train
from timm_adv.utils import find_resume_checkpoint

SMALL = ['--model', 'test_resnet', '-b', '32', '--train-num-samples', '256', '--val-num-samples', '64',
         '--adv-val-samples', '32', '--adv-val-steps', '1', '--lr', '0.1', '--warmup-epochs', '0', '--workers', '0',
         '--log-interval', '1000', '--epochs', '2', '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1',
         '--model-ema', '--model-ema-decay', '0.9', '--sched-on-updates']


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _signal_at(monkeypatch, epoch: int, batch: int, signum: int):
    """Sends ``signum`` to this process when the train loader yields ``batch`` of ``epoch`` (a scheduler's kill)."""
    real = train.create_train_loaders

    class SignallingLoader:
        def __init__(self, loader):
            self.loader, self.epoch = loader, -1

        def __len__(self):
            return len(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            self.epoch += 1
            for i, b in enumerate(self.loader):
                if (self.epoch, i) == (epoch, batch):
                    os.kill(os.getpid(), signum)
                yield b

    def create(*a, **k):
        loaders = real(*a, **k)
        loaders.train = SignallingLoader(loaders.train)
        return loaders

    monkeypatch.setattr(train, 'create_train_loaders', create)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_epoch_then_resume_auto_matches_uninterrupted(tmp_path, monkeypatch, signum):
    run = lambda name, *a: train.main([*SMALL, '--output', str(tmp_path), '--experiment', name, *a])
    if signum == signal.SIGTERM:
        run('full')
        full = _load(tmp_path / 'full' / 'last.pth.tar')
    with monkeypatch.context() as m:
        _signal_at(m, epoch=0, batch=3, signum=signum)
        with pytest.raises(SystemExit) as e:
            run('cut', '--resume', 'auto')  # first launch: nothing to resume, starts fresh
    assert e.value.code == 128 + signum  # what a launcher retries
    out = tmp_path / 'cut'
    assert not (out / 'last.pth.tar').exists()
    recovery = find_resume_checkpoint(str(out))
    assert os.path.basename(recovery) == 'recovery-0-3.pth.tar'  # the update in flight (batch 3) was finished
    saved = _load(recovery)
    assert saved['saver']['position']['batches'] == 4 and 'state_dict_ema' in saved and 'optimizer' in saved
    if signum != signal.SIGTERM:
        return  # the same path; the bitwise comparison runs once
    resumed = run('cut', '--resume', 'auto')
    final = _load(out / 'last.pth.tar')
    assert final['epoch'] == full['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in full[key].items():
            assert torch.equal(v, final[key][k]), f'{key}.{k}'
    for s_full, s_res in zip(full['optimizer']['state'].values(), final['optimizer']['state'].values()):
        assert torch.equal(s_full['momentum_buffer'], s_res['momentum_buffer'])
    assert resumed['top1'] == pytest.approx(float(full['metric']))


def test_resume_auto_skips_corrupt_files_and_needs_an_experiment(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'recovery-5-10.pth.tar').write_bytes(b'cut short by a kill')
    (out / 'last.pth.tar').write_bytes(b'')
    assert find_resume_checkpoint(str(out)) == ''
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, '--output', str(tmp_path), '--resume', 'auto'])
    assert e.value.code == 2 and '--resume auto finds the run by its folder: add --experiment' in capsys.readouterr().err

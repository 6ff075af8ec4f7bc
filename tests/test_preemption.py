"""Preemption: a signal mid-epoch writes a recovery checkpoint and exits restartably; ``--resume auto``
continues at the next batch, bitwise equal to an uninterrupted run (CPU)."""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
from torch.distributed import TCPStore

from timm_adv.cli import train
from timm_adv.utils import Preempted, PreemptionHandler, agree_on_attempt, find_resume_checkpoint

# FGSM-SDI (its generator, the generator's Adam and its every-2-batches schedule resume too), EMA, per-update
# LR, timm's default augmentation in a loader worker and random erasing in this process (the prefetcher's)
SMALL = ['--model', 'test_resnet', '--num-classes', '10', '--img-size', '32', '-b', '8', '--epochs', '2',
         '--workers', '1', '--reprob', '0.25', '--lr', '0.05', '--warmup-epochs', '0', '--log-interval', '1000',
         '--adv-val-samples', '10', '--adv-val-steps', '1', '--adv-method', 'fgsm-sdi', '--adv-eps', '0.1',
         '--adv-sdi-every', '2', '--model-ema', '--model-ema-decay', '0.9', '--sched-on-updates']


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


def test_signal_mid_epoch_then_resume_auto_matches_uninterrupted(tmp_path, monkeypatch, image_folder):
    run = lambda name, *a: train.main([*SMALL, '--data-dir', str(image_folder), '--output', str(tmp_path),
                                       '--experiment', name, *a])
    run('full')
    full = _load(tmp_path / 'full' / 'last.pth.tar')
    with monkeypatch.context() as m:
        _signal_at(m, epoch=0, batch=2, signum=signal.SIGTERM)  # of 5 batches
        with pytest.raises(SystemExit) as e:
            run('cut', '--resume', 'auto')  # first launch: nothing to resume, starts fresh
    assert e.value.code == 128 + signal.SIGTERM  # 143: what a launcher retries
    out = tmp_path / 'cut'
    assert not (out / 'last.pth.tar').exists()
    recovery = find_resume_checkpoint(str(out))
    assert os.path.basename(recovery) == 'recovery-0-2.pth.tar'  # the update in flight (batch 2) was finished
    saved = _load(recovery)
    assert saved['saver']['position']['batches'] == 3 and 'state_dict_ema' in saved and 'optimizer' in saved
    assert saved['task_state']['batches_seen'] == 3
    resumed = run('cut', '--resume', 'auto')
    assert not list(out.glob('recovery-*'))  # superseded by last.pth.tar once the epoch ended
    final = _load(out / 'last.pth.tar')
    assert final['epoch'] == full['epoch'] == 1
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in full[key].items():
            assert torch.equal(v, final[key][k]), f'{key}.{k}'
    for s_full, s_res in zip(full['optimizer']['state'].values(), final['optimizer']['state'].values()):
        assert torch.equal(s_full['momentum_buffer'], s_res['momentum_buffer'])
    for k, v in full['task_state']['generator'].items():
        assert torch.equal(v, final['task_state']['generator'][k]), f'generator.{k}'
    assert resumed['top1'] == pytest.approx(float(full['metric']))


def test_handler_records_sigusr1_and_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as preemption:
        assert preemption.requested() == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@120: the process lives on
        assert preemption.requested() == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert Preempted(signal.SIGUSR1).code == 138


def test_resume_auto_skips_corrupt_files_and_needs_an_experiment(tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'recovery-5-10.pth.tar').write_bytes(b'cut short by a kill')
    (out / 'last.pth.tar').write_bytes(b'')
    assert find_resume_checkpoint(str(out)) == ''
    with pytest.raises(SystemExit) as e:
        train.main([*SMALL, '--output', str(tmp_path), '--resume', 'auto'])  # fails before reading any data
    assert e.value.code == 2 and '--resume auto finds the run by its folder: add --experiment' in capsys.readouterr().err


def test_restarted_group_agrees_on_a_new_attempt_despite_the_old_keys():
    # ranks as threads on one store, as torchrun's agent keeps it across restarts: each restart must agree on a
    # new name whichever rank starts first, never on the name the store still holds from the attempt before
    server = TCPStore('127.0.0.1', 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    names = []
    for delays in ([0, 0, 0], [0.3, 0, 0.1], [0, 0.3, 0]):  # rank 0 late: the others first read the old name
        found = {}

        def rank(r):
            time.sleep(delays[r])
            client = TCPStore('127.0.0.1', server.port, None, False, timedelta(seconds=30))
            found[r] = agree_on_attempt(client, r, 3, timedelta(seconds=30))

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(found) == 3 and len(set(found.values())) == 1, found
        names.append(found[0])
    assert len(set(names)) == 3


def test_lost_rank_restarts_the_group_from_the_recovery_checkpoint(tmp_path, repo_root):
    # c10d rendezvous (--standalone), the one multi-node runs use; the static one (--master-port) keeps its store
    # across restarts too. One restart allowed: the group must come back at the first try.
    argv = ['--model', 'test_resnet', '-b', '16', '--train-num-samples', '128', '--val-num-samples', '32',
            '--adv-val-samples', '0', '--lr', '0.1', '--warmup-epochs', '0', '--workers', '0', '--log-interval', '1000',
            '--epochs', '1', '--recovery-interval', '1', '--output', str(tmp_path), '--resume', 'auto']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '--max-restarts',
           '1', os.path.join(repo_root, 'tests', 'lost_rank_worker.py'), '2', *argv]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=repo_root)
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only the launcher
        log = proc.communicate()[0] + '\n(timed out)'
    assert proc.returncode == 0, log[-3000:]
    assert 'failed (exitcode: -9) local_rank: 1' in log, log[-3000:]  # the kill happened, and only once:
    assert log.count('--resume auto: continuing from') == 2, log[-3000:]  # both ranks of the restart resumed
    # rank 1 died before its third batch: the restarted group continued after the second
    assert f'continuing from {tmp_path / "lost" / "recovery-0-1.pth.tar"}' in log, log[-3000:]
    whole, lost = _load(tmp_path / 'whole' / 'last.pth.tar'), _load(tmp_path / 'lost' / 'last.pth.tar')
    assert whole['epoch'] == lost['epoch'] == 0
    for k, v in whole['state_dict'].items():
        assert torch.equal(v, lost['state_dict'][k]), k

"""Disk and data faults: an unwritable output folder, a disk that fills while saving, unreadable images.
Each ends in one line naming the folder or file (no traceback) and leaves the previous checkpoint intact."""
import argparse
import errno
import logging
import os
import shutil

import pytest
import torch

from timm_adv.cli import train
from timm_adv.utils import check_writable

TINY = ['--model', 'test_resnet', '-b', '32', '--train-num-samples', '64', '--val-num-samples', '32',
        '--adv-val-samples', '0', '--workers', '0', '--warmup-epochs', '0', '--log-interval', '1000']


@pytest.fixture(autouse=True)
def fresh_log_handlers(monkeypatch):
    # train.main adds a stderr handler per call; one left by an earlier test writes to a closed capture
    monkeypatch.setattr(logging.root, 'handlers', [])


def _error_lines(capsys):
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err[-2000:]
    return [line for line in err.splitlines() if line.startswith('train.py: error:')]


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: read-only bits, or for root (who ignores them) sysfs."""
    if os.geteuid() != 0:
        folder = tmp_path / 'read-only'
        folder.mkdir()
        folder.chmod(0o555)
        yield str(folder)
        folder.chmod(0o755)
    else:
        try:
            check_writable('/sys', '--output')
        except ValueError:
            yield '/sys'
            return
        pytest.skip('no folder that root cannot write to')


def test_unwritable_output_fails_before_training(unwritable, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, '--epochs', '1', '--output', unwritable, '--experiment', 'run'])
    assert e.value.code == 2
    [line] = _error_lines(capsys)
    assert f"--output: cannot write to '{unwritable}'" in line


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, path, *a, **k):  # the disk fills while the second epoch's checkpoint is written
        if isinstance(obj, dict) and obj.get('epoch') == 1:
            with open(path, 'wb') as f:
                f.write(b'half a checkpoint')
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, '--epochs', '2', '--output', str(tmp_path), '--experiment', 'run'])
    assert e.value.code == 1
    [line] = _error_lines(capsys)
    run = tmp_path / 'run'
    assert f"cannot write a checkpoint in '{run}' (No space left on device); the previous checkpoints" in line
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert torch.load(run / 'last.pth.tar', weights_only=True)['epoch'] == 0  # epoch 0's, whole
    assert not (run / 'tmp.pth.tar').exists()


@pytest.fixture
def bad_folder(image_folder, tmp_path):
    """The tiny image folder plus a truncated PNG and a text file named like an image."""
    root = tmp_path / 'data'
    shutil.copytree(image_folder, root)
    png = (root / 'train' / '3' / '0.png').read_bytes()
    (root / 'train' / '3' / 'truncated.png').write_bytes(png[:len(png) // 2])
    (root / 'train' / '5' / 'notes.jpg').write_text('not an image')
    return root


def _folder_args(root):
    return ['--data-dir', str(root), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '32', '-b', '8',
            '--epochs', '1', '--adv-val-samples', '0', '--warmup-epochs', '0', '--log-interval', '1000']


def test_unreadable_image_stops_at_that_file_even_in_a_worker(bad_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*_folder_args(bad_folder), '--workers', '1', '--output', str(tmp_path), '--experiment', 'w'])
    assert e.value.code == 1
    [line] = _error_lines(capsys)
    assert ('truncated.png: cannot read this image' in line or 'notes.jpg: cannot read this image' in line) \
        and '--skip-bad-images' in line and str(bad_folder) in line


def test_skip_bad_images_counts_what_it_skips(bad_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train.main([*_folder_args(bad_folder), '--workers', '0', '--skip-bad-images', '--output', str(tmp_path),
                    '--experiment', 's'])
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith('--skip-bad-images: skipped')]
    assert len(skipped) == 2 and '2 skipped so far' in skipped[-1]
    assert any('truncated.png' in m for m in skipped) and any('notes.jpg' in m for m in skipped)


def test_skip_bad_images_on_a_dataset_without_files_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main([*TINY, '--epochs', '1', '--skip-bad-images', '--output', str(tmp_path), '--experiment', 'b'])
    [line] = _error_lines(capsys)
    assert "--skip-bad-images does nothing with --dataset 'bundled/mnist'" in line

import os

import pytest
import torch
from PIL import Image

# CI has two cores: bound intra-op threads unless the caller chose (OMP_NUM_THREADS=1 on a busy machine).
if 'OMP_NUM_THREADS' not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """A tiny 10-class image folder (train / validation) so that train.py runs in seconds."""
    root = tmp_path_factory.mktemp('digits')
    g = torch.Generator().manual_seed(0)
    for split, per_class in (('train', 4), ('validation', 2)):
        for c in range(10):
            os.makedirs(root / split / str(c))
            for i in range(per_class):
                pixels = (torch.rand(32, 32, 3, generator=g) * 80 + c * 17).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / str(c) / f'{i}.png')
    return root


def run_killed_and_resumed(run, tmp_path, monkeypatch, args):
    """Runs ``run('full', *args)``, then the same run killed in its second epoch and resumed from its
    ``last.pth.tar``; ``run(name, *argv)`` is a test's ``train.main`` wrapper writing to ``tmp_path / name``."""
    from timm_adv.cli import train
    run('full', *args)
    real_train_one_epoch = train.train_one_epoch

    def killed_in_second_epoch(epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt('simulated kill')
        return real_train_one_epoch(epoch, *a, **k)

    monkeypatch.setattr(train, 'train_one_epoch', killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run('killed', *args)
    monkeypatch.setattr(train, 'train_one_epoch', real_train_one_epoch)
    return run('killed', *args, '--resume', str(tmp_path / 'killed' / 'last.pth.tar'))

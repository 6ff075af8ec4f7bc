"""A pickle that runs code when loaded is refused by every loader of the project; the opt-ins say what they allow."""
import argparse
import logging
import os

import pytest
import timm
import torch

from timm_adv.models import load_feature_bank, resolve_mae_weights
from timm_adv.tasks import add_adv_args
from timm_adv.tasks.distill import create_teacher
from timm_adv.utils import RecoverySaver, find_resume_checkpoint, load_training_checkpoint, read_checkpoint
from timm_adv.vqgan import VQGANConfig, VQModel, load_vqgan_weights

TINY_VQGAN = dict(double_z=False, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0)


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the stand-in for an attacker's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def hostile(tmp_path):
    """A checkpoint-looking file (weights of ``test_resnet``) carrying the payload; returns ``(path, marker)``."""
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'recovery-0-1.pth.tar'
    state_dict = timm.create_model('test_resnet', num_classes=10).state_dict()
    torch.save({'epoch': 0, 'state_dict': state_dict, 'payload': Payload(str(marker))}, path)
    return str(path), marker


def _teacher(path):
    parser = argparse.ArgumentParser()
    add_adv_args(parser)
    args = parser.parse_args(['--adv-method', 'pgd', '--kd-model-name', 'test_resnet', '--kd-pretrained-path', path])
    args.num_classes = 10
    create_teacher(args, timm.create_model('test_resnet', num_classes=10))


def _saver(path):
    saver = RecoverySaver(torch.nn.Linear(1, 1), None, checkpoint_dir=os.path.dirname(path))
    assert saver.load_state_dict_from_checkpoint(path) is False  # its bookkeeping is not read either
    raise ValueError(f'{path}: refused')


LOADERS = {
    'train.py --resume / export / validate.py': lambda p: read_checkpoint(p, '--resume'),
    'validate.py --checkpoint': lambda p: load_training_checkpoint(timm.create_model('test_resnet', num_classes=10), p),
    'checkpoint bookkeeping': _saver,
    'VQGAN': lambda p: load_vqgan_weights(VQModel(VQGANConfig(embed_dim=4, n_embed=8, ddconfig=TINY_VQGAN)), p),
    'kNN bank': load_feature_bank,
    'MAE weights': lambda p: resolve_mae_weights('vit_base_patch16_224.mae', initial_checkpoint=p),
    'teacher weights': _teacher,
}


@pytest.mark.parametrize('loader', LOADERS)
def test_every_loader_refuses_code_in_a_pickle(hostile, loader):
    path, marker = hostile
    with pytest.raises(ValueError) as e:  # the bad-input error train.py / validate.py print as one line
        LOADERS[loader](path)
    assert '\n' not in str(e.value) and os.path.basename(path) in str(e.value)  # names the file
    assert not marker.exists()


def test_resume_auto_passes_over_a_hostile_recovery_file(hostile):
    path, marker = hostile
    assert find_resume_checkpoint(os.path.dirname(path)) == ''
    assert not marker.exists()


def test_vqgan_opt_in_says_what_it_allows(hostile, caplog):
    path, marker = hostile
    model = VQModel(VQGANConfig(embed_dim=4, n_embed=8, ddconfig=TINY_VQGAN))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError):  # code ran; its keys do not fit a VQGAN
        load_vqgan_weights(model, path, unsafe_pickle=True)
    assert marker.exists()  # the opt-in really unpickles: that is what it warns about
    assert 'weights_only=False), which runs any code the file holds' in caplog.text

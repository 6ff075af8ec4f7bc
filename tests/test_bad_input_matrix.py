"""Bad input, every method: each registered method (a new one joins automatically) x each bad input ends at
start-up in one line naming the flag: no traceback, no run folder, every input file unchanged."""
import logging

import pytest
import timm
import torch

from timm_adv.cli import train
from timm_adv.tasks import list_methods
from timm_adv.vqgan import VQGANConfig, VQModel, save_vqgan

from test_hostile_files import Payload


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A tiny VQGAN (the one component a method cannot start without) and the bad files the cases read."""
    root = tmp_path_factory.mktemp('bad_inputs')
    torch.manual_seed(0)
    save_vqgan(VQModel(VQGANConfig(embed_dim=4, n_embed=8, ddconfig=dict(
        double_z=False, ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=0, attn_resolutions=[], in_channels=3,
        resolution=32, z_channels=4))), str(root / 'vqgan'))
    (root / 'corrupt.pth.tar').write_bytes(b'\x80\x02 truncated' * 8)
    torch.save({'epoch': 0, 'state_dict': timm.create_model('resnet10t', num_classes=10).state_dict()},
               root / 'resnet10t.pth.tar')
    torch.save({'state_dict': {}, 'payload': Payload(str(root / 'code-ran'))}, root / 'hostile.pth.tar')
    return root


# (flag the message must name, the bad arguments); {root} is the files fixture's folder
CASES = {
    'eps <= 0': ('--adv-eps', ['--adv-eps', '-1']),
    'steps < 1': ('--adv-steps', ['--adv-steps', '0']),
    'missing VQGAN': ('--adv-dat-vqgan', ['--adv-dat-vqgan', '{root}/absent-vqgan']),
    'missing stage-1 checkpoint': ('--pretrained-path', ['--pretrained', '--pretrained-path', '{root}/absent.pth.tar']),
    'missing teacher': ('--kd-model-name', ['--kd-model-name', 'local-dir:{root}/absent-teacher']),
    'unknown architecture': ('--model', ['--model', 'no_such_net']),
    'corrupt checkpoint': ('--resume', ['--resume', '{root}/corrupt.pth.tar']),
    'wrong-architecture checkpoint': ('--resume', ['--resume', '{root}/resnet10t.pth.tar']),
    'wrong-architecture initial weights': ('--initial-checkpoint', ['--initial-checkpoint', '{root}/resnet10t.pth.tar']),
    # label-free methods refuse a teacher before reading it: their line names --kd-model-name
    'code in a teacher pickle': ('--kd-', ['--kd-model-name', 'test_resnet', '--kd-pretrained-path',
                                                          '{root}/hostile.pth.tar']),
}


def _base(method, root):
    extra = ['--adv-dat-vqgan', str(root / 'vqgan')] if method == 'dat' else []
    return ['--model', 'test_resnet', '--adv-method', method, '-b', '16', '--train-num-samples', '32',
            '--val-num-samples', '16', '--adv-val-samples', '8', '--adv-val-steps', '1', '--workers', '0', '--epochs', '1', *extra]


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('method', list_methods())
def test_bad_input_is_one_line_naming_the_flag(method, case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logging.root, 'handlers', [])  # train.main adds one per call
    flag, bad = CASES[case]
    bad = [a.format(root=files) for a in bad]
    before = {p: p.read_bytes() for p in files.rglob('*') if p.is_file()}
    argv = _base(method, files)
    if flag == '--adv-dat-vqgan' and method == 'dat':
        argv = argv[:-2]  # replace the working VQGAN with the missing one
    with pytest.raises(SystemExit) as e:
        train.main([*argv, *bad, '--output', str(tmp_path), '--experiment', 'run'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err[-3000:]
    errors = [line for line in err.splitlines() if ': error: ' in line]
    assert len(errors) == 1 and flag in errors[0], err[-3000:]
    assert not (tmp_path / 'run').exists()
    assert {p: p.read_bytes() for p in files.rglob('*') if p.is_file()} == before
    assert not (files / 'code-ran').exists()

"""Nothing leaked: tokens planted in the environment and the args, the home folder and the host name stay out of
every file a run writes (tokens) and every file it exports or publishes (all of them)."""
import os
import socket

import pytest
import timm
import torch
import torch.nn as nn

from timm_adv.cli import train
from timm_adv.hub import export_checkpoint, publish_folder, write_model_card
from timm_adv.tasks.dat import DATTask
from timm_adv.vqgan import VQGANConfig, VQModel, save_vqgan

HF_TOKEN = 'hf_' + 'Zq8' * 12
WANDB_KEY = '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b'
HOST = 'gpu-node-17.cluster.example'


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A home folder, a host name and two tokens, planted where a careless run would copy them from."""
    home = tmp_path / 'home' / 'ana'
    home.mkdir(parents=True)
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('HF_TOKEN', HF_TOKEN)
    monkeypatch.setenv('WANDB_API_KEY', WANDB_KEY)
    monkeypatch.setattr(socket, 'gethostname', lambda: HOST)
    return home


def _grep(path, *needles):
    data = path.read_bytes()
    return [n for n in needles if n.encode() in data]


def test_run_files_carry_no_token_and_exports_no_machine_detail(machine, monkeypatch):
    parse_args = train.parse_args

    def parse_with_secrets(argv=None):  # a wrapper script that stores credentials and notes in the args
        args, text = parse_args(argv)
        args.hf_token = os.environ['HF_TOKEN']
        args.notes = f'wandb {os.environ["WANDB_API_KEY"]} on {HOST} from {machine}/runs'
        return args, text

    monkeypatch.setattr(train, 'parse_args', parse_with_secrets)
    out = machine / 'out'
    train.main(['--model', 'test_resnet', '-b', '32', '--train-num-samples', '64', '--val-num-samples', '32',
                '--adv-val-samples', '0', '--epochs', '1', '--workers', '0', '--output', str(out), '--experiment', HOST])
    run = out / HOST
    for name in ('args.yaml', 'last.pth.tar'):  # local: secrets go, paths stay (-c args.yaml finds the data)
        assert _grep(run / name, HF_TOKEN, WANDB_KEY) == [], name
    assert str(machine) in (run / 'args.yaml').read_text()

    folder = machine / 'export'
    export_checkpoint(str(run / 'last.pth.tar'), str(folder))
    write_model_card(str(folder), 'me/robust')
    exported = sorted(p for p in folder.rglob('*') if p.is_file())
    assert {'config.json', 'README.md', 'training_args.yaml', 'model.safetensors'} <= {p.name for p in exported}
    for path in exported:
        assert _grep(path, HF_TOKEN, WANDB_KEY, str(machine), HOST, '/home/') == [], path.name
    publish_folder(str(folder), 'me/robust', dry_run=True)

    with open(folder / 'README.md', 'a') as f:  # a hand edit that brings a path back is refused before upload
        f.write(f'\nTrained from {machine}/data\n')
    with pytest.raises(ValueError, match='README.md.*holds a home folder or host name; nothing was uploaded'):
        publish_folder(str(folder), 'me/robust', dry_run=True)


def test_task_state_keeps_no_machine_detail(machine):
    vqgan_dir = machine / HOST / 'vqgan'
    torch.manual_seed(0)
    save_vqgan(VQModel(VQGANConfig(embed_dim=4, n_embed=8, ddconfig=dict(
        double_z=False, ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=0, attn_resolutions=[], in_channels=3,
        resolution=32, z_channels=4))), str(vqgan_dir))
    args, _ = train.parse_args(['--adv-method', 'dat', '--adv-dat-vqgan', str(vqgan_dir)])
    args.num_classes = 10
    model = DATTask.prepare_model(timm.create_model('test_resnet', num_classes=10), args)
    task = DATTask.from_args(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    text = repr(task.get_task_state())
    assert 'vqgan' in text and str(machine) not in text and HOST not in text

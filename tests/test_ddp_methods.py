"""Methods under 2-process torchrun (gloo, CPU): the processes must end with the same state.

Each method trains one short epoch (two batches per process) through train.py's own setup; each rank then
saves its model, the method's state and (kNN methods) its feature bank, and the tests compare the ranks.
"""
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from timm_adv.vqgan import VQGANConfig, VQModel, save_vqgan

# per method: its flags (the kNN methods' bank holds the 16 training images, so k is small)
METHODS = {
    'advprop': [],
    'fgsm-sdi': [],
    'advbn': ['--initial-checkpoint', ''],  # filled with a plain checkpoint of the same model
    'contrastive': ['--adv-knn-k', '3', '--adv-contrastive-hflip', '0'],
    'ssat': ['--adv-knn-k', '3', '--adv-ssat-guides', '2', '--adv-steps', '1'],
    'dat': [],  # the tiny VQGAN's path is added by the fixture
}


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory, repo_root):
    """Runs a method under torchrun on first request; returns both ranks' saved states."""
    root = tmp_path_factory.mktemp('ddp')
    rng = np.random.RandomState(0)
    for split, per_class in (('train', 4), ('validation', 1)):
        for c in range(4):
            os.makedirs(root / 'data' / split / str(c))
            for i in range(per_class):
                img = (rng.rand(16, 16, 3) * 60 + c * 50).astype(np.uint8)
                Image.fromarray(img).save(root / 'data' / split / str(c) / f'{i}.png')
    common = ['--data-dir', str(root / 'data'), '--model', 'test_resnet', '--num-classes', '4', '--img-size', '16',
              '--epochs', '1', '--no-aug', '-b', '4', '--lr', '0.05', '--warmup-epochs', '0', '--workers', '0',
              '--adv-val-samples', '4', '--adv-val-steps', '1', '--log-interval', '100', '--output', str(root / 'out')]
    torch.manual_seed(0)
    tiny = VQGANConfig(embed_dim=4, n_embed=32, ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 1, 1], num_res_blocks=0,
                                                             attn_resolutions=[], in_channels=3, resolution=16,
                                                             z_channels=4))
    method_flags = {'dat': ['--adv-dat-vqgan', save_vqgan(VQModel(tiny), str(root / 'vqgan'))]}
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=repo_root)
    runs = {}

    def run(method):
        if method in runs:
            return runs[method]
        extra = list(METHODS[method])
        if '--initial-checkpoint' in extra:
            import timm
            plain = root / 'plain.pth'
            torch.save({'state_dict': timm.create_model('test_resnet', num_classes=4).state_dict()}, plain)
            extra[extra.index('--initial-checkpoint') + 1] = str(plain)
        # two batches per process; FGSM-SDI updates its generator on the first
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
               os.path.join(repo_root, 'tests', 'ddp_worker.py'), str(root / method), *common,
               '--adv-method', method, '--experiment', method, *extra, *method_flags.get(method, [])]
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only the launcher
            raise
        assert proc.returncode == 0, log[-3000:]
        runs[method] = [torch.load(f'{root / method}-rank{r}.pt', weights_only=True) for r in range(2)]
        return runs[method]

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), f'{what}: {k} differs between processes'


def test_advprop_processes_agree_on_both_bn_sets(ddp_run):
    rank0, rank1 = ddp_run('advprop')
    aux = [k for k in rank0['model'] if '.aux_bn.0.' in k and k.endswith('running_mean')]
    assert aux
    _assert_same(rank0['model'], rank1['model'], 'advprop model')  # weights by DDP, both BN sets by --dist-bn reduce


def test_fgsm_sdi_processes_share_one_generator(ddp_run):
    rank0, rank1 = ddp_run('fgsm-sdi')
    _assert_same(rank0['model'], rank1['model'], 'fgsm-sdi model')
    gen0, gen1 = rank0['generator'], rank1['generator']
    _assert_same(gen0, gen1, 'generator')  # rank 0's initialisation broadcast, gradients and BN stats averaged
    assert gen0['stem.1.num_batches_tracked'] >= 1  # it was trained


def test_advbn_processes_agree_on_both_bn_sets(ddp_run):
    rank0, rank1 = ddp_run('advbn')
    aux = [k for k in rank0['model'] if '.aux_bn.0.' in k and k.endswith('running_mean')]
    assert aux and all(k.startswith(('layer2', 'layer3', 'layer4')) for k in aux)  # dual BNs after the cut only
    _assert_same(rank0['model'], rank1['model'], 'advbn model')  # back weights by DDP, both BN sets by --dist-bn
    assert rank0['model']['layer2.0.bn1.aux_bn.0.num_batches_tracked'] >= 1  # the adversarial BNs were trained


@pytest.mark.parametrize('method', ['contrastive', 'ssat'])
def test_knn_methods_agree_on_weights_and_sharded_bank(ddp_run, method):
    rank0, rank1 = ddp_run(method)
    _assert_same(rank0['model'], rank1['model'], f'{method} model')
    # each rank embedded half of the 16 training images; the gathered banks are whole, equal and in order
    assert rank0['bank_features'].shape[0] == 16
    assert torch.equal(rank0['bank_labels'], torch.arange(4).repeat_interleave(4))
    _assert_same({'f': rank0['bank_features']}, {'f': rank1['bank_features']}, f'{method} bank')
    assert torch.equal(rank0['bank_labels'], rank1['bank_labels'])


def test_dat_processes_agree_and_share_one_vqgan(ddp_run):
    rank0, rank1 = ddp_run('dat')
    _assert_same(rank0['model'], rank1['model'], 'dat model')  # each rank attacked its own shard, DDP averaged
    assert rank0['vqgan'].keys() == rank1['vqgan'].keys()
    assert all(torch.equal(rank0['vqgan'][k], rank1['vqgan'][k]) for k in rank0['vqgan'])  # frozen, bit-identical

import argparse
import os

import pytest
import timm
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


@pytest.fixture(scope='session')
def vqgan_dir(tmp_path_factory):
    """A tiny f = 4 VQGAN, saved as the discretiser's folder format (config.yaml + model.safetensors)."""
    from timm_adv.vqgan import VQGANConfig, VQModel, save_vqgan
    config = VQGANConfig(embed_dim=4, n_embed=32, ddconfig=dict(
        double_z=False, ch=32, out_ch=3, ch_mult=[1, 1, 1], num_res_blocks=0, attn_resolutions=[], in_channels=3,
        resolution=32, z_channels=4))
    torch.manual_seed(0)
    return str(save_vqgan(VQModel(config), str(tmp_path_factory.mktemp('vqgan'))))


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory):
    """A test_resnet teacher saved the way the Hub stores timm models (config.json + model.safetensors)."""
    from timm.models import save_for_hf
    path = tmp_path_factory.mktemp('teacher')
    torch.manual_seed(1)
    save_for_hf(timm.create_model('test_resnet', num_classes=10), str(path), safe_serialization=True)
    return path


@pytest.fixture(scope='session')
def plain_checkpoint(tmp_path_factory):
    """Weights of a plain 10-class test_resnet, the starting point of a fine-tuning method."""
    path = tmp_path_factory.mktemp('plain') / 'plain.pth'
    torch.manual_seed(2)
    torch.save({'state_dict': timm.create_model('test_resnet', num_classes=10).state_dict()}, path)
    return str(path)


@pytest.fixture(scope='session')
def stage1_checkpoint(tmp_path_factory):
    """A contrastive (stage-1) test_resnet checkpoint in train.py's layout: the feature model in ``state_dict``,
    the projection head in ``task_state``."""
    from timm_adv.layers import split_projection_head_state
    from timm_adv.tasks import ContrastiveTask
    path = tmp_path_factory.mktemp('stage1') / 'last.pth.tar'
    torch.manual_seed(3)
    model = ContrastiveTask.prepare_model(timm.create_model('test_resnet', num_classes=10))
    features, head = split_projection_head_state(model.state_dict())
    torch.save({'epoch': 0, 'arch': 'test_resnet', 'state_dict': features, 'task_state': {'projection_head': head}},
               path)
    return str(path)


def mae_checkpoint(path, embed_dim=64, img_size=28, decoder_dim=32, seed=0):
    """An original-format MAE pre-training checkpoint: encoder (7x7 grid) + decoder + mask token."""
    from timm.models.vision_transformer import Block
    torch.manual_seed(seed)
    encoder = timm.create_model('test_vit', patch_size=4, img_size=img_size, embed_dim=embed_dim, num_classes=0,
                                global_pool='token')
    state_dict = {k: v.clone() for k, v in encoder.state_dict().items()}
    state_dict['pos_embed'].normal_(std=0.1)
    num_patches = (img_size // 4) ** 2
    state_dict.update({
        'mask_token': torch.randn(1, 1, decoder_dim),
        'decoder_embed.weight': torch.randn(decoder_dim, embed_dim), 'decoder_embed.bias': torch.zeros(decoder_dim),
        'decoder_pos_embed': torch.randn(1, num_patches + 1, decoder_dim),
        'decoder_norm.weight': torch.ones(decoder_dim), 'decoder_norm.bias': torch.zeros(decoder_dim),
        'decoder_pred.weight': torch.randn(4 * 4 * 3, decoder_dim), 'decoder_pred.bias': torch.zeros(4 * 4 * 3),
    })
    state_dict.update({f'decoder_blocks.0.{k}': v for k, v in Block(decoder_dim, 2).state_dict().items()})
    torch.save({'model': state_dict, 'epoch': 799, 'args': argparse.Namespace(model='mae_vit_test')}, path)
    return state_dict


@pytest.fixture(scope='session')
def mae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('mae') / 'mae_pretrain_test.pth'
    return path, mae_checkpoint(path)


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

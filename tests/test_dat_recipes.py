"""Every recipe and hub config that names a VQGAN starts as written: train.py builds the model and the VQGAN
from the place the docs name and trains a step, with stand-in weights (random, the published architecture)."""
import glob
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from timm_adv.cli import train
from timm_adv.hub.pipeline import load_hub_config, train_command
from timm_adv.vqgan import VQGANConfig, VQModel, load_vqgan_config, preset_folder, save_vqgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names_vqgan(path):
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    method_args = config.get('method_args') or {}
    return bool(config.get('adv_dat_vqgan') or method_args.get('adv-dat-vqgan'))


RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, 'recipes', '*.yaml')) if _names_vqgan(p))
HUB_CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, 'hub_configs', '*.yaml'))
                     if _names_vqgan(p) or (load_hub_config(p, check_method=False).get('method') == 'dat'))
# the tiny stand-in of each architecture: 4 px patches keep a ViT's grid at 32 px
TINY_MODELS = {'vit': ['--model', 'test_vit', '--model-kwargs', 'patch_size=4', 'img_size=32'],
               'resnet': ['--model', 'test_resnet']}


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    """$TIMM_ADV_HOME with stand-in vq-f8 weights where the docs put them, and a tiny image folder."""
    root = tmp_path_factory.mktemp('dat_recipes')
    previous = os.environ.get('TIMM_ADV_HOME')
    os.environ['TIMM_ADV_HOME'] = str(root / 'home')
    torch.manual_seed(0)
    save_vqgan(VQModel(load_vqgan_config('vq-f8')), preset_folder('vq-f8'))  # what `convert --config vq-f8` writes
    rng = np.random.RandomState(0)
    for split in ('train', 'validation'):
        for c in range(2):
            os.makedirs(root / 'data' / split / str(c))
            for i in range(1):  # two images: one step of batch 2
                Image.fromarray((rng.rand(40, 40, 3) * 255).astype(np.uint8)).save(root / 'data' / split / str(c) / f'{i}.png')
    yield root
    if previous is None:
        os.environ.pop('TIMM_ADV_HOME')
    else:
        os.environ['TIMM_ADV_HOME'] = previous


def _tiny(arch: str):
    return TINY_MODELS['vit' if arch.startswith('vit') else 'resnet']


def _one_step(argv, root, name):
    """The command as written, shrunk to one step of a tiny model at 32 px on the image folder."""
    train.main(argv + ['--data-dir', str(root / 'data'), '--img-size', '32', '-b', '2', '--epochs', '1',
                       '--warmup-epochs', '0', '--cooldown-epochs', '0', '--grad-accum-steps', '1', '--workers', '0',
                       '--adv-val-samples', '2', '--adv-val-steps', '1', '--output', str(root / 'out'),
                       '--experiment', name, '--log-interval', '1'])
    with open(root / 'out' / name / 'summary.csv') as f:
        assert 'train_loss_dat' in f.readline()


def _tiny_recipe(recipe, root):
    with open(recipe) as f:
        config = yaml.safe_load(f)
    arch = str(config['model'])
    assert config['adv_dat_vqgan'] == 'vq-f8', 'the documented preset, read from its cache folder'
    config.update(pretrained=False, model=_tiny(arch)[1])
    path = root / os.path.basename(recipe)
    path.write_text(yaml.safe_dump(config))
    return str(path), arch


@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_starts_with_the_documented_vqgan(recipe, home):
    path, arch = _tiny_recipe(recipe, home)
    _one_step(['-c', path] + _tiny(arch)[2:], home, 'recipe-' + os.path.basename(recipe)[:-5])


@pytest.mark.parametrize('hub_config', HUB_CONFIGS, ids=os.path.basename)
def test_hub_config_starts_with_the_documented_vqgan(hub_config, home, tmp_path, monkeypatch):
    config = load_hub_config(hub_config)
    argv = train_command(config, str(home / 'out'), 'x')[1:-4]  # without train.py, --output, --experiment
    vqgan = (argv + ['--adv-dat-vqgan', 'vq-f8'])[argv.index('--adv-dat-vqgan') + 1] if '--adv-dat-vqgan' in argv \
        else 'vq-f8'  # else in the recipe
    assert vqgan == 'vq-f8' or config['dataset'].startswith('bundled/'), 'ImageNet configs name the documented preset'
    if vqgan != 'vq-f8':  # a folder written by `python -m timm_adv.vqgan fit`, relative to the working folder
        monkeypatch.chdir(tmp_path)
        tiny = VQGANConfig(embed_dim=4, n_embed=16, ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 1, 1], num_res_blocks=0,
                                                                 attn_resolutions=[], in_channels=3, resolution=32,
                                                                 z_channels=4))
        save_vqgan(VQModel(tiny), vqgan)
    if '-c' in argv:
        argv[argv.index('-c') + 1], _ = _tiny_recipe(argv[argv.index('-c') + 1], tmp_path)
    argv = [a for a in argv if a != '--pretrained']
    argv[argv.index('--model') + 1:argv.index('--model') + 2] = _tiny(config['architecture'])[1:]
    for flag in ('--dataset',):  # the image folder instead of the dataset named
        if flag in argv:
            del argv[argv.index(flag):argv.index(flag) + 2]
    _one_step(argv, home, 'hub-' + os.path.basename(hub_config)[:-5])

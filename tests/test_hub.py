"""Export, offline Hub round trip, publishing, hub configs, and the robustness evaluation library."""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from timm_adv.cli import train
from timm_adv.data import BundledMnist, TransformSubset, apply_bundled_defaults, spread_subset
from timm_adv.evaluation import (ALEXNET_ERRORS, IMAGENET_A_INDICES, IMAGENET_C_CORRUPTIONS, IMAGENET_R_INDICES,
                                 SEVERITIES, CorruptedDataset, CorruptionFolderError, LogitSubset, PixelSpaceModel,
                                 compute_mce, evaluate_autoattack, evaluate_corruption_folder, evaluate_shift,
                                 report_to_markdown, save_report, scan_corruption_folder)
from timm_adv.hub import (ExportError, export_checkpoint, export_from_task, load_hub_config, populate_hf_cache,
                          publish_folder, render_model_card, sample_batch, write_model_card)
from timm_adv.hub.pipeline import train_command, validate_command
from timm_adv.tasks import PGDTrainingTask, get_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = 'test-org/test_resnet.pgd_mnist'
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=1.0, crop_mode='center',
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _train_args(model='test_resnet', method='pgd'):
    args, _ = train.parse_args(['--model', model, '--adv-method', method, '--adv-eps', '0.1', '--adv-steps', '2'])
    args.dataset = 'bundled/mnist'
    apply_bundled_defaults(args)
    return args


def _trained_like_model(args):
    """A model whose BN statistics and head are not at their init values (outputs depend on all of it)."""
    torch.manual_seed(0)
    model = get_method(args.adv_method).prepare_model(timm.create_model(args.model, num_classes=args.num_classes), args)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    nn.init.normal_(model.fc.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A checkpoint in the layout timm's CheckpointSaver writes for train.py, plus the model it holds."""
    root = tmp_path_factory.mktemp('run')
    args = _train_args()
    model = _trained_like_model(args)
    path = str(root / 'last.pth.tar')
    torch.save({'epoch': 0, 'arch': args.model, 'state_dict': model.state_dict(), 'args': args}, path)
    return path, model, args


@pytest.fixture(scope='module')
def exported(checkpoint, tmp_path_factory):
    path, model, _ = checkpoint
    folder = str(tmp_path_factory.mktemp('export') / 'test_resnet.pgd_mnist')
    result, _ = export_checkpoint(path, folder)
    write_model_card(folder, REPO_ID)
    return folder, result


def _offline_env(hf_home):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(hf_home), PYTHONPATH=REPO)
    env.pop('HF_HUB_CACHE', None)
    return env


# ---------------------------------------------------------------- export and round trip

def test_export_writes_plain_timm_config(exported):
    folder, result = exported
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors', 'training_args.yaml']
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    assert config['architecture'] == 'test_resnet' and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    cfg = config['pretrained_cfg']
    assert tuple(cfg['input_size']) == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['interpolation'] == 'bilinear' and cfg['license'] == 'apache-2.0'
    assert tuple(cfg['mean']) == tuple(timm.create_model('test_resnet').pretrained_cfg['mean'])  # training mean
    # training metadata only under the top-level key timm ignores
    assert config['timm_adv']['method'] == 'pgd' and config['timm_adv']['method_args']['adv_eps'] == 0.1
    assert not any(k.startswith('adv_') for k in cfg) and not any(k.startswith('adv_') for k in config.get('model_args', {}))
    assert result.max_abs_diff == 0.0


def test_local_dir_gives_trained_outputs(checkpoint, exported):
    _, model, _ = checkpoint
    folder, _ = exported
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = sample_batch(DATA_CONFIG, batch_size=4, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert tuple(loaded.pretrained_cfg['input_size']) == (3, 32, 32)  # a list with older timm


def test_offline_hub_cache_round_trip_and_validate(checkpoint, exported, tmp_path):
    _, model, _ = checkpoint
    folder, _ = exported
    populate_hf_cache(folder, REPO_ID, str(tmp_path / 'hf' / 'hub'))
    x = sample_batch(DATA_CONFIG, batch_size=4, seed=2)
    torch.save(x, tmp_path / 'x.pt')
    script = ('import sys, timm, torch\n'
              f"m = timm.create_model('hf-hub:{REPO_ID}', pretrained=True).eval()\n"
              "with torch.no_grad(): torch.save(m(torch.load(sys.argv[1])), sys.argv[2])\n")
    env = _offline_env(tmp_path / 'hf')
    run = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'x.pt'), str(tmp_path / 'y.pt')], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'y.pt'), model(x))

    # validate.py evaluates the hub model offline; same numbers as the local folder
    common = ['--num-samples', '32', '-b', '32', '--workers', '0', '--attack', 'pgd', '--eps', '0.1', '--steps', '2']
    run = subprocess.run([sys.executable, 'validate.py', '--model', f'hf-hub:{REPO_ID}', *common,
                          '--results-file', str(tmp_path / 'hub.json'), '--results-format', 'json',
                          '--report-dir', str(tmp_path / 'report')], env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    hub = json.load(open(tmp_path / 'hub.json'))[0]
    from timm_adv.cli import validate
    local = validate.main(['--model', f'local-dir:{folder}', *common])
    assert hub['top1'] == local['top1'] and hub['pgd2_top1'] == local['pgd2_top1'] and hub['samples'] == 32
    # ... and they are the trained model's numbers (its weights, not a fresh init)
    from timm.data import create_loader
    from timm_adv.evaluation import evaluate_accuracy
    cfg = model.pretrained_cfg
    loader = create_loader(spread_subset(BundledMnist('validation'), 32), input_size=(3, 32, 32),
                           batch_size=32, mean=cfg['mean'], std=cfg['std'], crop_pct=1.0, interpolation='bilinear',
                           use_prefetcher=False)
    expected = evaluate_accuracy(model, loader)
    assert hub['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert hub['loss'] == pytest.approx(expected['loss'], abs=1e-4)
    report = json.load(open(tmp_path / 'report' / 'robustness.json'))
    assert report['clean']['top1'] == pytest.approx(hub['top1'], abs=1e-3) and report['pgd'][0]['steps'] == 2


class _DualBNTask(PGDTrainingTask):
    """A method that trains with timm split (auxiliary) BNs and strips them on export."""

    def export_model(self):
        from timm.layers import SplitBatchNorm2d

        def strip(module):
            for name, child in module.named_children():
                if isinstance(child, SplitBatchNorm2d):
                    bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                    bn.load_state_dict({k: v for k, v in child.state_dict().items() if not k.startswith('aux_bn')})
                    setattr(module, name, bn)
                else:
                    strip(child)
        strip(self.unwrapped_model)
        return self.unwrapped_model


def test_export_goes_through_the_method_hook(tmp_path):
    from timm.layers import convert_splitbn_model
    args = _train_args()
    model = convert_splitbn_model(_trained_like_model(args), 2).eval()
    x = sample_batch(DATA_CONFIG, seed=3)
    with torch.no_grad():
        expected = model(x)
    task = _DualBNTask(model, nn.CrossEntropyLoss(), attack=None, verbose=False)
    result = export_from_task(task, str(tmp_path / 'out'), DATA_CONFIG, architecture='test_resnet')
    assert not any('aux_bn' in k for k in result.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-6)


def test_export_refuses_changed_outputs_and_leftover_parts(tmp_path):
    args = _train_args()

    class Perturbing(PGDTrainingTask):
        def export_model(self):
            plain = _trained_like_model(args)
            plain.load_state_dict(self.unwrapped_model.state_dict())
            plain.fc.bias.data += 1.0
            return plain

    class Leftover(PGDTrainingTask):
        def export_model(self):
            self.unwrapped_model.aux_generator = nn.Conv2d(3, 3, 1)
            return self.unwrapped_model

    with pytest.raises(ExportError, match='changes the outputs.*export_model'):
        export_from_task(Perturbing(_trained_like_model(args), nn.CrossEntropyLoss(), attack=None, verbose=False),
                         str(tmp_path / 'a'), DATA_CONFIG, architecture='test_resnet')
    with pytest.raises(ExportError, match='training-only keys.*aux_generator'):
        export_from_task(Leftover(_trained_like_model(args), nn.CrossEntropyLoss(), attack=None, verbose=False),
                         str(tmp_path / 'b'), DATA_CONFIG, architecture='test_resnet')
    assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def test_export_bad_checkpoints(checkpoint, tmp_path):
    path, model, args = checkpoint
    unknown = argparse.Namespace(**dict(vars(args), model='no_such_arch_v9'))
    torch.save({'state_dict': model.state_dict(), 'args': unknown}, tmp_path / 'unknown.pth.tar')
    with pytest.raises(ExportError, match="'no_such_arch_v9' is unknown to timm"):
        export_checkpoint(str(tmp_path / 'unknown.pth.tar'), str(tmp_path / 'o1'))
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'noargs.pth.tar')
    with pytest.raises(ExportError, match='no training arguments'):
        export_checkpoint(str(tmp_path / 'noargs.pth.tar'), str(tmp_path / 'o2'))
    os.makedirs(tmp_path / 'full')
    open(tmp_path / 'full' / 'x', 'w').close()
    with pytest.raises(ExportError, match='--overwrite'):
        export_checkpoint(path, str(tmp_path / 'full'))


def test_export_cli_bad_input_exits_cleanly(tmp_path, capsys):
    from timm_adv.hub.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(['export', str(tmp_path / 'missing.pth.tar'), '--out', str(tmp_path / 'o')])
    assert exit_info.value.code == 2 and 'no such file' in capsys.readouterr().err


# ---------------------------------------------------------------- publish

class _FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(('create_repo', kwargs))
        return 'https://huggingface.co/' + kwargs['repo_id']

    def create_branch(self, **kwargs):
        self.calls.append(('create_branch', kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(('upload_folder', kwargs))
        return argparse.Namespace(oid='abc123')


def test_publish_dry_run_and_mocked_upload(exported, tmp_path, monkeypatch):
    folder, _ = exported
    api = _FakeApi()
    dry = publish_folder(folder, REPO_ID, dry_run=True, api=api)
    assert dry['dry_run'] and 'model.safetensors' in dry['files'] and api.calls == []
    out = publish_folder(folder, REPO_ID, private=True, revision='v1', commit_message='robust weights', api=api)
    names = [c[0] for c in api.calls]
    assert names == ['create_repo', 'create_branch', 'upload_folder'] and out['commit'] == 'abc123'
    assert api.calls[0][1]['private'] is True and api.calls[2][1]['revision'] == 'v1'
    assert api.calls[2][1]['commit_message'] == 'robust weights' and api.calls[2][1]['folder_path'] == folder
    os.makedirs(tmp_path / 'partial')
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        publish_folder(str(tmp_path / 'partial'), REPO_ID, dry_run=True)
    monkeypatch.setattr('timm_adv.hub.publish._saved_token', lambda: None)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    with pytest.raises(RuntimeError, match='HF_TOKEN'):
        publish_folder(folder, REPO_ID)


# ---------------------------------------------------------------- hub configs and model cards

def test_hub_configs_are_complete():
    paths = sorted(glob.glob(os.path.join(REPO, 'hub_configs', '*.yaml')))
    configs = {os.path.basename(p): load_hub_config(p, check_method=False) for p in paths}
    configs = {k: c for k, c in configs.items() if c['status'] != 'imported'}  # test_zoo checks those
    assert configs['resnet10t_pgd_mnist.yaml']['status'] == 'trained'
    assert {c['method'] for c in configs.values()} >= {'pgd', 'advprop', 'dat', 'fgsm-sdi'}
    assert sum(c['status'] == 'not-yet-trained' for c in configs.values()) >= 4
    from timm_adv.tasks import list_methods
    for name, cfg in configs.items():  # every config of an implemented method passes the full check
        if cfg['method'] in list_methods():
            load_hub_config(os.path.join(REPO, 'hub_configs', name))
    assert {c['method'] for c in configs.values()} <= set(list_methods())
    demo = load_hub_config(os.path.join(REPO, 'hub_configs', 'resnet10t_pgd_mnist.yaml'))
    argv = train_command(demo, '/tmp/out', 'exp')
    args, _ = train.parse_args(argv[1:])
    assert args.model == 'resnet10t' and args.adv_method == 'pgd' and args.adv_eps == 0.1 and args.epochs == 1
    from timm_adv.cli import validate
    vargs = validate.parse_args(validate_command(demo, 'local-dir:/x', '/tmp/r')[1:])
    assert vargs.autoattack == 'standard' and vargs.corruptions_generated and vargs.eps == [0.05, 0.1, 0.2]


def test_hub_config_errors(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('repo_id: a/b\nstatus: maybe\narchitecture: resnet10t\nmethod: pgd\ndataset: x\nlicense: mit\n'
                    'evaluation: {}\n')
    with pytest.raises(ValueError, match='status must be one of'):
        load_hub_config(str(path))
    path.write_text('repo_id: a/b\n')
    with pytest.raises(ValueError, match='lacks status'):
        load_hub_config(str(path))


def test_model_card_shows_measured_table_and_plots(exported, tmp_path):
    folder, _ = exported
    report = dict(model='m', dataset='bundled/mnist', clean=dict(top1=97.5, top5=99.9, samples=1000),
                  attack_subset_clean=dict(top1=98.0, samples=500),  # validate.py --attack-samples adds it
                  pgd=[dict(attack='pgd', eps=e, norm='linf', steps=20, step_size=e / 8, restarts=1, samples=500,
                            top1=a) for e, a in ((0.05, 90.0), (0.1, 71.25))])
    text = render_model_card(folder, REPO_ID, report=report, train_command='python train.py --model test_resnet',
                             plots={'accuracy_vs_eps': 'accuracy_vs_eps.png'})
    assert '| PGD-20 | linf eps=0.1, step=0.0125, restarts=1 | 500 | 71.25 |' in text
    assert '![accuracy vs eps](accuracy_vs_eps.png)' in text and 'python train.py --model test_resnet' in text
    assert 'Madry' in text and '@inproceedings{madry2018towards' in text and 'library_name: timm' in text
    written = save_report(report, str(tmp_path))
    assert open(written['accuracy_vs_eps'], 'rb').read(4) == b'\x89PNG'


# ---------------------------------------------------------------- corruptions

def test_mce_arithmetic():
    at_alexnet = {c: {s: 100.0 * (1 - ALEXNET_ERRORS[c]) for s in SEVERITIES} for c in IMAGENET_C_CORRUPTIONS}
    assert compute_mce(at_alexnet)['mce'] == pytest.approx(100.0)
    top1 = {c: {s: 50.0 for s in SEVERITIES} for c in IMAGENET_C_CORRUPTIONS}
    top1['fog'] = {1: 90.0, 2: 80.0, 3: 70.0, 4: 60.0, 5: 50.0}  # mean error 0.30
    out = compute_mce(top1)
    assert out['ce']['fog'] == pytest.approx(100 * 0.30 / 0.819324)
    assert out['ce']['brightness'] == pytest.approx(100 * 0.5 / 0.564592)
    assert out['mce'] == pytest.approx(sum(out['ce'].values()) / 15)
    del top1['snow'][4]
    with pytest.raises(ValueError, match='snow/4'):
        compute_mce(top1)


def _image_folder(root, classes, n=2, size=36):
    for i, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * i + 10 * k, np.uint8)).save(os.path.join(root, c, f'{k}.png'))


def test_corruption_folder_errors_and_evaluation(tmp_path):
    root = tmp_path / 'c'
    for s in (1, 2):
        _image_folder(str(root / 'fog' / str(s)), ['7', '3'])
    _image_folder(str(root / 'snow' / '1'), ['7', '3'])
    with pytest.raises(CorruptionFolderError, match=r'--corruption-dir.*lacks 20 .*gaussian_noise, shot_noise'):
        scan_corruption_folder(str(root))
    with pytest.raises(CorruptionFolderError, match='lacks 3 corruption.*: fog/3, snow/2, snow/3'):
        scan_corruption_folder(str(root), ['fog', 'snow'], [1, 2, 3])

    class Const(nn.Module):  # predicts class 7 for every image
        num_classes = 10

        def forward(self, x):
            return torch.eye(10)[7].expand(x.shape[0], 10)

    labels = [str(i) for i in range(10)]
    out = evaluate_corruption_folder(Const(), str(root), DATA_CONFIG, ['fog'], [1, 2], label_names=labels)
    assert out['top1'] == {'fog': {1: 50.0, 2: 50.0}} and 'mce' not in out  # folder '7' maps to output 7


def test_validate_reports_incomplete_corruption_folder(tmp_path, capsys):
    from timm_adv.cli import validate
    _image_folder(str(tmp_path / 'c' / 'fog' / '1'), ['0'])
    with pytest.raises(SystemExit) as exit_info:
        validate.main(['--model', 'test_resnet', '--num-samples', '4', '--workers', '0', '--corruption-dir',
                       str(tmp_path / 'c')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and '--corruption-dir' in err and 'gaussian_noise' in err


def test_generated_corruptions_run_on_numpy2_and_repeat():
    ds = BundledMnist('validation')
    clean = CorruptedDataset(ds, 'brightness', 1, DATA_CONFIG)[0][0]
    for name in ('fog', 'glass_blur', 'gaussian_blur', 'gaussian_noise'):  # the first three need the NumPy 2 bridges
        a, target = CorruptedDataset(ds, name, 3, DATA_CONFIG)[0]
        b, _ = CorruptedDataset(ds, name, 3, DATA_CONFIG)[0]
        assert a.shape == (3, 32, 32) and target == ds.targets[0]
        assert torch.equal(a, b) and not torch.equal(a, clean)


# ---------------------------------------------------------------- AutoAttack

def _mnist_batch(n=8):
    from timm.data import create_loader
    loader = create_loader(TransformSubset(BundledMnist('validation'), range(n)), input_size=(3, 32, 32),
                           batch_size=n, use_prefetcher=False, mean=DATA_CONFIG['mean'], std=DATA_CONFIG['std'],
                           crop_pct=1.0, interpolation='bilinear')
    return next(iter(loader))


def test_pixel_space_wrapper_matches_normalised_model():
    model = _trained_like_model(_train_args())
    x, _ = _mnist_batch(4)
    wrapper = PixelSpaceModel(model, DATA_CONFIG['mean'], DATA_CONFIG['std']).eval()
    with torch.no_grad():
        assert torch.allclose(wrapper(wrapper.to_pixels(x)), model(x), atol=1e-5)


@pytest.fixture(scope='module')
def autoattack_run():
    """Our AutoAttack wrapper at a small eps, the official attack's own in/out batches, and the inputs."""
    pyautoattack = pytest.importorskip('pyautoattack')
    model = _trained_like_model(_train_args())
    x, _ = _mnist_batch(8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correctly classified
    captured = {}
    real_run = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, x_orig, y_orig, **kwargs):
        out = real_run(self, x_orig, y_orig, **kwargs)
        captured.update(x_orig=x_orig.clone(), x_adv=out[0].clone())
        return out

    pyautoattack.AutoAttack.run_standard_evaluation = spy
    try:
        ours = evaluate_autoattack(model, [(x[:4], y[:4]), (x[4:], y[4:])], eps=AA_EPS, mean=DATA_CONFIG['mean'],
                                   std=DATA_CONFIG['std'], num_samples=8, version='custom',
                                   attacks=['apgd-ce', 'apgd-t'], n_iter=10)
    finally:
        pyautoattack.AutoAttack.run_standard_evaluation = real_run
    return ours, captured, model, x, y


AA_EPS = 3 / 255


def test_autoattack_matches_the_official_code_run_directly(autoattack_run):
    import pyautoattack
    from torchvision.transforms import Normalize
    ours, _, model, x, y = autoattack_run
    mean, std = (torch.tensor(DATA_CONFIG[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    pixels = x * std + mean
    pixel_model = nn.Sequential(Normalize(DATA_CONFIG['mean'], DATA_CONFIG['std']), model).eval()
    adversary = pyautoattack.AutoAttack(pixel_model, eps=AA_EPS, norm='Linf', version='custom',
                                        attacks=['apgd-ce', 'apgd-t'], seed=0, device='cpu')
    adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = 10
    x_adv, _ = adversary.run_standard_evaluation(pixels, y, batch_size=250)
    with torch.no_grad():
        robust = 100.0 * (pixel_model(x_adv).argmax(1) == y).float().mean().item()
    assert 0.0 < robust < 100.0  # a small eps where the comparison means something
    assert ours['robust_top1'] == pytest.approx(robust) and ours['clean_top1'] == 100.0
    assert ours['per_attack']['apgd-t'] == ours['robust_top1'] and ours['samples'] == 8
    assert ours['iterations'] == {'apgd-ce': 10, 'apgd-t': 10} and ours['n_iter'] == 10


def test_autoattack_perturbations_stay_within_eps_in_pixel_space(autoattack_run):
    _, captured, _, x, _ = autoattack_run
    mean, std = (torch.tensor(DATA_CONFIG[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    assert torch.allclose(captured['x_orig'], x * std + mean, atol=1e-6)  # the attack sees pixels in [0, 1]
    delta = captured['x_adv'] - captured['x_orig']
    assert delta.abs().max() <= AA_EPS + 1e-6  # eps is in pixel units, not normalised ones (eps / std)
    assert delta.abs().max() > 0.9 * AA_EPS
    assert captured['x_adv'].min() >= 0 and captured['x_adv'].max() <= 1


def test_autoattack_iterations_are_read_from_the_attack_objects():
    from pyautoattack import AutoAttack
    from timm_adv.evaluation.autoattack import attack_iterations
    adversary = AutoAttack(nn.Identity(), eps=8 / 255, version='standard')
    assert attack_iterations(adversary) == {'apgd-ce': 100, 'apgd-t': 100, 'fab-t': 100, 'square': 5000}
    adversary.apgd.n_iter, adversary.square.n_queries = 7, 50
    assert attack_iterations(adversary) == {'apgd-ce': 7, 'apgd-t': 100, 'fab-t': 100, 'square': 50}


@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory):
    """16 real digits as an image folder (``validation/<class>/``): validate.py without loading bundled MNIST."""
    root = tmp_path_factory.mktemp('digits')
    ds = spread_subset(BundledMnist('validation'), 16)
    for i in range(len(ds)):
        image, label = ds[i]
        os.makedirs(root / 'validation' / str(label), exist_ok=True)
        image.save(root / 'validation' / str(label) / f'{i:02d}.png')
    return root


FOLDER_FLAGS = ['--num-classes', '10', '--img-size', '32', '--crop-pct', '1.0', '--interpolation', 'bilinear',
                '--workers', '0']


def test_validate_passes_subset_amp_and_channels_last_to_every_evaluation(monkeypatch, digit_folder):
    from timm_adv.cli import validate
    seen = {}

    def fake_autoattack(model, loader, **kwargs):
        seen['aa'] = (list(loader.dataset.indices), kwargs)
        return dict(version='custom', attacks=['apgd-ce'], norm='linf', eps=kwargs['eps'], robust_top1=0.0,
                    clean_top1=0.0, samples=4, iterations={'apgd-ce': 2})

    def fake_corruptions(model, dataset, data_config, **kwargs):
        seen['corruptions'] = kwargs
        return dict(source='generated', top1={'fog': {1: 0.0}}, mean_top1=0.0, samples=4)

    monkeypatch.setattr(validate, 'evaluate_autoattack', fake_autoattack)
    monkeypatch.setattr(validate, 'evaluate_generated_corruptions', fake_corruptions)
    common = ['--model', 'test_resnet', '--no-pretrained', '--data-dir', str(digit_folder), *FOLDER_FLAGS,
              '--num-samples', '12', '--autoattack', 'custom',
              '--aa-attacks', 'apgd-ce', '--aa-samples', '4', '--corruptions-generated', '--corruptions', 'fog',
              '--severities', '1']
    results = validate.main([*common, '--aa-subset', 'first', '--amp', '--channels-last'])
    indices, kwargs = seen['aa']
    assert indices == [0, 1, 2, 3]  # RobustBench: the first N
    for kw in (kwargs, seen['corruptions']):
        assert kw['channels_last'] is True
        with kw['amp_autocast']():
            assert torch.is_autocast_enabled('cpu')
    assert results['aa_iterations'] == 'apgd-ce:2'
    validate.main(common)
    indices, kwargs = seen['aa']
    assert indices == [0, 3, 6, 9] and kwargs['channels_last'] is False  # evenly spaced
    with kwargs['amp_autocast']():
        assert not torch.is_autocast_enabled('cpu')


class _Probe(nn.Module):
    """Predicts class 0 and records each batch, its memory format and whether autocast is on."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((x.detach().float().clone(), x.is_contiguous(memory_format=torch.channels_last),
                           torch.is_autocast_enabled('cpu')))
        return torch.eye(10)[0].expand(x.shape[0], 10) + 0 * x.mean()


def test_pixel_space_model_runs_under_amp_and_channels_last():
    probe = _Probe()
    wrapper = PixelSpaceModel(probe, DATA_CONFIG['mean'], DATA_CONFIG['std'], channels_last=True,
                              amp_autocast=lambda: torch.autocast('cpu', dtype=torch.bfloat16))
    assert wrapper(torch.rand(2, 3, 8, 8)).dtype == torch.float32
    assert probe.calls[-1][1:] == (True, True)


def test_imagenet_c_folder_uses_the_reference_centre_crop(tmp_path):
    root = tmp_path / 'c'
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (40, 1, 3))  # 40 px: crop and resize differ
    for s in (1, 2):
        os.makedirs(root / 'fog' / str(s) / '0')
        Image.fromarray(ramp).save(root / 'fog' / str(s) / '0' / 'a.png')
    mean, std = (torch.tensor(DATA_CONFIG[k]).view(3, 1, 1) for k in ('mean', 'std'))
    centre = (torch.from_numpy(ramp[4:36, 4:36]).permute(2, 0, 1).float() / 255 - mean) / std
    inputs = {}
    for protocol in ('hendrycks', 'model'):
        probe = _Probe()
        out = evaluate_corruption_folder(probe, str(root), DATA_CONFIG, ['fog'], [1, 2], protocol=protocol,
                                         amp_autocast=lambda: torch.autocast('cpu', dtype=torch.bfloat16),
                                         channels_last=True)
        assert out['protocol'] == protocol and out['top1'] == {'fog': {1: 100.0, 2: 100.0}}
        x, channels_last, autocast = probe.calls[0]
        assert channels_last and autocast  # --channels-last / --amp reach the corruption evaluation
        inputs[protocol] = x[0]
    assert torch.allclose(inputs['hendrycks'], centre, atol=1e-6)  # centre crop, no resize
    assert not torch.allclose(inputs['model'], centre, atol=1e-2)  # the model's transform resizes 40 -> 32
    text = report_to_markdown(dict(clean=dict(top1=90.0, top5=99.0, samples=1), corruptions=out))
    assert 'model protocol' in text and "the model's eval transform" in text


def test_autoattack_bad_input(monkeypatch):
    model = nn.Identity()
    with pytest.raises(ValueError, match='--aa-attacks'):
        evaluate_autoattack(model, [], eps=0.1, mean=(0.5,), std=(0.5,), version='custom')
    with pytest.raises(ValueError, match='fixes 100 iterations'):
        evaluate_autoattack(model, [], eps=0.1, mean=(0.5,), std=(0.5,), n_iter=5)
    monkeypatch.setitem(sys.modules, 'pyautoattack', None)
    with pytest.raises(ImportError, match=r"pip install 'timm-adv\[eval\]'"):
        evaluate_autoattack(model, [], eps=0.1, mean=(0.5,), std=(0.5,))
    from timm_adv.cli import validate
    with pytest.raises(SystemExit) as exit_info:  # before any evaluation work
        validate.main(['--model', 'test_resnet', '--num-samples', '4', '--workers', '0', '--autoattack', 'standard'])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------- distribution shift and reports

def test_shift_subsets_and_errors(tmp_path):
    for indices in (IMAGENET_A_INDICES, IMAGENET_R_INDICES):
        assert len(set(indices)) == 200 and list(indices) == sorted(indices) and max(indices) < 1000
    assert IMAGENET_A_INDICES.index(207) == 38 and IMAGENET_A_INDICES[-1] == 988 and IMAGENET_R_INDICES[:3] == (1, 2, 4)
    logits = torch.arange(1000.).view(1, -1)
    sub = LogitSubset(nn.Identity(), IMAGENET_A_INDICES)
    assert torch.equal(sub(logits), torch.tensor([IMAGENET_A_INDICES], dtype=torch.float))
    small = timm.create_model('test_resnet', num_classes=10)
    _image_folder(str(tmp_path / 'a'), ['n01', 'n02'])
    with pytest.raises(ValueError, match='1000-class'):
        evaluate_shift(small, str(tmp_path / 'a'), 'imagenet-a', DATA_CONFIG)
    big = timm.create_model('test_resnet', num_classes=1000)
    with pytest.raises(ValueError, match='has 2 class folders; imagenet-a has 200'):
        evaluate_shift(big, str(tmp_path / 'a'), 'imagenet-a', DATA_CONFIG)


def test_report_table_holds_independently_computed_numbers(tmp_path, digit_folder):
    from timm_adv.cli import validate
    from timm.data import create_dataset
    from timm_adv.evaluation import CorruptedDataset
    validate.main(['--model', 'test_resnet', '--no-pretrained', '--data-dir', str(digit_folder), *FOLDER_FLAGS,
                   '-b', '8', '--seed', '3', '--corruptions-generated', '--corruptions', 'fog', '--severities', '3', '--report-dir',
                   str(tmp_path), '--no-plots'])
    rows = {}
    for line in (tmp_path / 'robustness.md').read_text().splitlines():
        cells = [c.strip() for c in line.strip('|').split('|')]
        if len(cells) == 4 and cells[3].replace('.', '').isdigit():
            rows[cells[0]] = (cells[1], int(cells[2]), float(cells[3]))
    # the same model and images, scored here without the evaluation library
    torch.manual_seed(3)
    model = timm.create_model('test_resnet', num_classes=10).eval()
    raw = create_dataset('', root=str(digit_folder / 'validation'))
    corrupted = CorruptedDataset(raw, 'fog', 3, DATA_CONFIG | dict(mean=model.pretrained_cfg['mean'],
                                                                   std=model.pretrained_cfg['std']), seed=3)
    images, labels = zip(*(corrupted[i] for i in range(16)))
    with torch.no_grad():
        expected = 100.0 * (model(torch.stack(images)).argmax(1) == torch.tensor(labels)).float().mean().item()
    setting, samples, top1 = rows['Corruptions (regenerated)']
    assert samples == 16 and top1 == pytest.approx(expected, abs=0.005) and '1 corruptions x 1 severities' in setting
    assert 'Note: Corruptions regenerated' in (tmp_path / 'robustness.md').read_text()
    from timm.data import create_transform
    clean_tf = create_transform((3, 32, 32), interpolation='bilinear', crop_pct=1.0, mean=model.pretrained_cfg['mean'],
                                std=model.pretrained_cfg['std'])
    with torch.no_grad():
        clean = model(torch.stack([clean_tf(raw[i][0]) for i in range(16)])).argmax(1)
    expected_clean = 100.0 * (clean == torch.tensor(labels)).float().mean().item()
    assert rows['Clean'][1] == 16 and rows['Clean'][2] == pytest.approx(expected_clean, abs=0.005)

"""The robustness evaluation library: corruptions, AutoAttack, distribution shift and reports, alone and through
validate.py."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

from test_hub import DATA_CONFIG, _train_args, _trained_like_model
from timm_adv.data import BundledMnist, TransformSubset, spread_subset
from timm_adv.evaluation import (ALEXNET_ERRORS, IMAGENET_A_INDICES, IMAGENET_C_CORRUPTIONS, IMAGENET_R_INDICES,
                                 SEVERITIES, CorruptedDataset, CorruptionFolderError, LogitSubset, PixelSpaceModel,
                                 compute_mce, evaluate_autoattack, evaluate_corruption_folder, evaluate_shift,
                                 report_to_markdown, scan_corruption_folder)


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


# ---------------------------------------------------------------- progress of long evaluations

def test_long_evaluations_log_progress_with_the_time_left(monkeypatch, caplog, digit_folder, tmp_path):
    from timm_adv.cli import validate
    import timm_adv.utils.progress as progress
    with caplog.at_level(logging.INFO):  # short runs stay quiet at the default interval
        log = progress.ProgressLog(3, 'Quick')
        for _ in range(3):
            log.update()
    assert not [r for r in caplog.records if r.getMessage().startswith('Quick')]
    pytest.importorskip('pyautoattack')
    monkeypatch.setattr(progress, 'DEFAULT_INTERVAL_S', 0.0)
    results = tmp_path / 'results.json'
    with caplog.at_level(logging.INFO):
        validate.main(['--model', 'test_resnet', '--no-pretrained', '--data-dir', str(digit_folder), *FOLDER_FLAGS,
                       '-b', '8', '--attack', 'pgd', '--eps', '0.05', '0.1', '--steps', '1',
                       '--corruptions-generated', '--corruptions', 'fog', '--severities', '1', '2',
                       '--autoattack', 'custom', '--aa-attacks', 'apgd-ce', '--aa-iters', '2', '--aa-samples', '4',
                       '--results-file', str(results), '--results-format', 'json'])
    lines = [r.getMessage() for r in caplog.records]

    def has(prefix, *parts):
        return any(line.startswith(prefix) and all(p in line for p in parts) for line in lines)
    assert has('PGD accuracy vs eps: 1/2 eps (50%)', 'elapsed', 'left', 'eps=0.05 done')
    assert has('Attack eps=0.1: 1/2 batches (50%)', 'left', 'acc@1')
    assert has('Generated corruptions: 1/2 settings (50%)', 'left', 'fog severity 1: top-1')
    assert has('AutoAttack: ', 'model calls of the budget', 'left at most', 'running apgd-ce')
    assert json.load(open(results))[0]['aa_samples'] == 4  # the machine-readable output is untouched

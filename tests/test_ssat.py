"""Self-supervised AT: InfoNCE, the kNN classifier, the guided attack, stages 1 and 2, resume, export, validate --knn."""
import argparse
import csv
import json
import logging

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_adv.cli import train
from timm_adv.cli import validate
from conftest import run_killed_and_resumed
from timm_adv.attacks import create_knn_guided_attack, select_guides
from timm_adv.data import BundledMnist, ViewAugment, create_bank_loader
from timm_adv.hub import export_checkpoint
from timm_adv.loss import info_nce, pair_top1
from timm_adv.models import (BANK_FILE, FeatureBank, KNNClassifier, build_feature_bank, knn_search, load_feature_bank,
                             save_feature_bank)
from timm_adv.tasks import ContrastiveTask, SSATTask, create_task

DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=1.0, crop_mode='center',
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FAST = ['--model', 'test_resnet', '--no-aug', '-b', '64', '--lr', '0.1', '--warmup-epochs', '0', '--workers', '0',
        '--log-interval', '1000', '--adv-val-samples', '40', '--adv-val-steps', '2', '--adv-val-eps', '0.1',
        '--adv-knn-k', '20', '--adv-knn-bank-samples', '200']
STAGE1 = ['--adv-method', 'contrastive', '--adv-contrastive-hflip', '0', '--opt', 'adam', '--lr', '1e-3']


def _run(data_dir, tmp_path, name, *extra):
    return train.main([*FAST, '--data-dir', str(data_dir), '--img-size', '32', '--crop-pct', '1.0', '--num-classes',
                       '10', '--output', str(tmp_path), '--experiment', name, *extra])


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _digits(split, n):
    """``n`` evenly spaced bundled digits of ``split`` as one normalised batch."""
    loader = create_bank_loader('bundled/mnist', None, split, DATA_CONFIG, batch_size=n, num_samples=n)
    return next(iter(loader))


def _reference_vote(query, bank, labels, k, temperature, num_classes):
    """kNN log-probabilities the slow way: full sort, then a Python loop over the neighbours."""
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    for i, q in enumerate(query.double()):
        sims = bank.double() @ q
        order = sims.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for j in order:
            votes[labels[j]] += torch.exp((sims[j] - 1.0) / temperature)
        out[i] = votes.clamp_min(1e-12).log() - votes.sum().log()
    return out


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    """An image folder of 256 training and 100 validation digits: train.py epochs of four batches."""
    root = tmp_path_factory.mktemp('digits')
    for split, n in (('train', 256), ('validation', 100)):
        dataset = BundledMnist(split)
        for i in range(n):
            img, label = dataset[i * len(dataset) // n]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{i:04d}.png')
    return root


@pytest.fixture(scope='module')
def stage1(digits_dir, tmp_path_factory):
    """Two epochs of contrastive pre-training of test_resnet on real digits, through train.py."""
    root = tmp_path_factory.mktemp('stage1')
    metrics = _run(digits_dir, root, 'stage1', '--epochs', '2', *STAGE1)
    return root / 'stage1', metrics


def test_info_nce_lower_for_aligned_than_shuffled_pairs():
    torch.manual_seed(0)
    a = torch.randn(32, 16)
    b = a + 0.3 * torch.randn_like(a)
    shuffled = b[torch.randperm(32)]
    assert info_nce(a, b) < info_nce(a, shuffled) - 1.0
    assert pair_top1(a, b) == 100.0 and pair_top1(a, shuffled) < 20.0
    # the weighted form averages only the selected pairs; none selected gives 0 with a graph for backward
    a.requires_grad_(True)
    weight = torch.zeros(32)
    weight[:8] = 1
    per_pair = torch.stack([info_nce(a, b, weight=F.one_hot(torch.tensor(i), 32).float()) for i in range(8)])
    assert torch.allclose(info_nce(a, b, weight=weight), per_pair.mean(), atol=1e-5)
    empty = info_nce(a, b, weight=torch.zeros(32))
    empty.backward()
    assert empty.item() == 0.0 and a.grad.abs().sum() == 0


@pytest.mark.parametrize('backend', ['torch', 'faiss'])
def test_knn_matches_brute_force_reference(backend):
    if backend == 'faiss':
        pytest.importorskip('faiss')
    torch.manual_seed(0)
    bank = FeatureBank(torch.randn(500, 16), torch.randint(0, 7, (500,)), num_classes=7)
    query = F.normalize(torch.randn(20, 16), dim=1)
    knn = KNNClassifier(nn.Identity(), bank, k=11, temperature=0.1, backend=backend)
    expected = _reference_vote(query, bank.features, bank.labels, 11, 0.1, 7)
    assert torch.allclose(knn.vote(query).double(), expected, atol=1e-5)
    full_sims, full_idx = (query @ bank.features.t()).topk(11, dim=1)
    for chunk in (64, 10_000):  # a bank larger than one chunk merges per-chunk top-k exactly
        sims, idx = knn_search(query, bank.features, 11, backend=backend, chunk_size=chunk)
        assert torch.equal(idx, full_idx) and torch.allclose(sims, full_sims, atol=1e-6)


def test_feature_bank_round_trip_and_bad_input(tmp_path):
    bank = FeatureBank(torch.randn(30, 8), torch.arange(30) % 3)
    path = str(tmp_path / BANK_FILE)
    save_feature_bank(bank, path, metadata={'split': 'train'})
    loaded = load_feature_bank(path)
    assert torch.equal(loaded.features, bank.features) and torch.equal(loaded.labels, bank.labels)
    assert loaded.num_classes == 3
    with pytest.raises(ValueError, match='--knn-k 31'):
        KNNClassifier(nn.Identity(), bank, k=31)
    with pytest.raises(FileNotFoundError, match='--knn-bank'):
        load_feature_bank(str(tmp_path / 'missing.safetensors'))


def test_guided_attack_lowers_knn_accuracy():
    torch.manual_seed(0)
    backbone = timm.create_model('test_resnet', num_classes=0).eval()
    bank_loader = create_bank_loader('bundled/mnist', None, 'train', DATA_CONFIG, batch_size=100, num_samples=300)
    knn = KNNClassifier(backbone, build_feature_bank(backbone, bank_loader, 10), k=20)
    x, y = _digits('validation', 64)
    eps = 0.03
    attack = create_knn_guided_attack(eps=eps, steps=10, num_guides=30, mean=DATA_CONFIG['mean'],
                                      std=DATA_CONFIG['std'])
    x_adv = attack(knn, x, y)
    noise = (x * 0.5 + 0.5 + eps * torch.empty_like(x).uniform_(-1, 1).sign()).clamp(0, 1) * 2 - 1
    with torch.no_grad():
        clean, adv, noisy = [(knn(v).argmax(1) == y).float().mean().item() * 100 for v in (x, x_adv, noise)]
    assert clean >= 40.0  # random test_resnet features: far above chance (10)
    assert adv <= clean - 25.0 and adv <= noisy - 20.0, (clean, adv, noisy)  # measured: 48.4, 12.5, 40.6
    assert ((x_adv - x) * 0.5).abs().max() <= eps + 1e-5  # inside the eps ball, in pixel units
    guides = select_guides(knn.embed(x), knn.bank, y, m=30)
    guide_labels = knn.bank.labels[(guides[:, :1] @ knn.bank.features.t()).squeeze(1).argmax(1)]
    assert guides.shape == (64, 30, knn.bank.dim) and bool((guide_labels != y).all())


def _ssat_task(backbone, bank_loader, eps=0.05, steps=3):
    attack = create_knn_guided_attack(eps=eps, steps=steps, num_guides=30, mean=DATA_CONFIG['mean'],
                                      std=DATA_CONFIG['std'])
    return SSATTask(backbone, bank_loader, 10, attack, mean=DATA_CONFIG['mean'], std=DATA_CONFIG['std'], knn_k=20,
                    verbose=False)


def test_stage2_raises_clean_adversarial_agreement_on_fixed_batch():
    torch.manual_seed(0)
    backbone = timm.create_model('test_resnet', num_classes=0)
    bank_loader = create_bank_loader('bundled/mnist', None, 'train', DATA_CONFIG, batch_size=100, num_samples=200)
    task = _ssat_task(backbone, bank_loader)
    x, y = _digits('train', 32)

    def agreement():
        task.on_epoch_start(0)
        knn = task.knn_classifier()
        torch.manual_seed(1)
        with torch.no_grad():
            reference = knn(x).argmax(1)
        x_adv = task.attack(knn, x, reference)
        with torch.no_grad():
            return F.cosine_similarity(knn.embed(x), knn.embed(x_adv)).mean().item()

    before = agreement()
    optimizer = torch.optim.Adam(backbone.parameters(), lr=3e-3)
    task.train()
    for _ in range(8):
        result = task(x, y)
        result['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {'loss', 'fooled', 'agreement'} <= set(result)
    assert task.weights_version == 8 and len(task.bank_refresh_seconds) == 1  # one bank while training
    after = agreement()
    assert after > before + 0.05, (before, after)


def test_view_augment_stays_in_range_and_differs():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    augment = ViewAugment(scale=(0.3, 1.0), hflip=0.5, jitter=0.4, noise_std=0.05)
    v1, v2 = augment(x), augment(x)
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert (v1 - v2).abs().mean() > 0.01
    identity = ViewAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)
    assert torch.allclose(identity(x), x, atol=1e-5)
    with pytest.raises(ValueError, match='^scale needs'):
        ViewAugment(scale=(0.0, 1.0))


def test_view_augment_colour_operations_for_rgb_and_none_on_grey():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    geometry = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)
    gray = ViewAugment(**geometry, grayscale=1.0)(x)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    luma = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(gray[:, 0], luma, atol=1e-6)
    for op in (dict(saturation=0.8), dict(hue=0.3)):
        out = ViewAugment(**geometry, **op)(x)
        assert (out - x).abs().mean() > 0.01 and out.min() >= 0 and out.max() <= 1, op
        out_luma = (out * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
        assert (out_luma - luma).abs().mean() < 0.05, op  # colour changes, brightness stays (up to clipping)
    blurred = ViewAugment(**geometry, blur=1.0)(x)
    assert blurred.std() < x.std() and torch.allclose(blurred.mean(), x.mean(), atol=0.02)  # smooths, keeps mean
    digits = x[:, :1].expand(-1, 3, -1, -1)  # grey images: the colour defaults change nothing
    assert torch.allclose(ViewAugment(**geometry, saturation=0.4, hue=0.1, grayscale=0.2)(digits), digits, atol=1e-5)
    with pytest.raises(ValueError, match='^hue must be'):
        ViewAugment(hue=0.7)


@pytest.mark.parametrize('bad,message', [(['--adv-contrastive-scale', '0', '1'], '--adv-contrastive-scale needs'),
                                         (['--adv-contrastive-hue', '0.7'], '--adv-contrastive-hue must be'),
                                         (['--adv-knn-temperature', '0'], '--adv-knn-temperature must be')])
def test_stage1_library_errors_name_the_flags(bad, message):
    args, _ = train.parse_args(['--adv-method', 'contrastive', '--no-aug', '--num-classes', '10', *bad])
    model = ContrastiveTask.prepare_model(timm.create_model('test_resnet', num_classes=0), args)
    with pytest.raises(ValueError, match=f'^{message}'):
        create_task(model, None, args)


def test_stage1_warns_when_the_loader_augments(caplog):
    args, _ = train.parse_args(['--adv-method', 'contrastive', '--scale', '0.5', '1', '--num-classes', '10'])
    assert not args.no_aug
    with caplog.at_level(logging.WARNING):
        ContrastiveTask.from_args(ContrastiveTask.prepare_model(timm.create_model('test_resnet', num_classes=0), args),
                                  None, args)
    assert 'both views are sub-crops of one crop' in caplog.text


def test_stage1_trains_feature_model_with_knn_validation(stage1):
    run, metrics = stage1
    rows = _summary(run / 'summary.csv')
    assert {'train_pair_top1', 'eval_top1', 'eval_pgd_top1', 'eval_pgd_softvote_top1', 'eval_pgd_guided_top1'} <= set(rows[0])
    for row in rows:  # the per-epoch robust figure is the per-sample worst case of the two attacks
        assert float(row['eval_pgd_top1']) <= min(float(row['eval_pgd_softvote_top1']), float(row['eval_pgd_guided_top1']))
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])  # InfoNCE falls without labels
    assert metrics['top1'] >= 40.0  # kNN top-1 (chance: 10)
    ckpt = _load(run / 'last.pth.tar')
    assert not any(k.startswith(('fc.', 'projection_head.')) for k in ckpt['state_dict'])
    assert set(ckpt['task_state']['projection_head']) == {'projection_head.fc1.weight', 'projection_head.fc1.bias',
                                                          'projection_head.fc2.weight', 'projection_head.fc2.bias'}


def test_stage2_from_stage1_through_train_py(stage1, digits_dir, tmp_path, caplog):
    run, stage1_metrics = stage1
    with caplog.at_level(logging.WARNING):
        _run(digits_dir, tmp_path, 'stage2', '--epochs', '1', '--adv-method', 'ssat', '--adv-eps', '0.1', '--adv-steps', '1',
             '--adv-ssat-guides', '20', '--opt', 'adam', '--lr', '1e-4', '--pretrained', '--pretrained-path',
             str(run / 'last.pth.tar'))
    assert 'without a stage-1 checkpoint' not in caplog.text
    row = _summary(tmp_path / 'stage2' / 'summary.csv')[0]
    assert {'train_fooled', 'train_agreement', 'eval_top1', 'eval_pgd_top1'} <= set(row)
    assert float(row['train_fooled']) > 0


def test_stage1_resume_matches_uninterrupted(digits_dir, tmp_path, monkeypatch):
    run_killed_and_resumed(lambda name, *a: _run(digits_dir, tmp_path, name, *a), tmp_path, monkeypatch,
                           ['--epochs', '2', *STAGE1])
    full, resumed = _load(tmp_path / 'full' / 'last.pth.tar'), _load(tmp_path / 'killed' / 'last.pth.tar')
    for k, v in full['state_dict'].items():
        assert torch.equal(v, resumed['state_dict'][k]), k
    for k, v in full['task_state']['projection_head'].items():
        assert torch.equal(v, resumed['task_state']['projection_head'][k]), k
    rows_full, rows_res = _summary(tmp_path / 'full' / 'summary.csv'), _summary(tmp_path / 'killed' / 'summary.csv')
    assert rows_full[1]['eval_top1'] == rows_res[1]['eval_top1']


def test_export_feature_model_with_bank_and_validate_knn(stage1, digits_dir, tmp_path):
    run, metrics = stage1
    out = tmp_path / 'hub'
    exported, train_args = export_checkpoint(str(run / 'last.pth.tar'), str(out), knn_bank=True)
    config = json.loads((out / 'config.json').read_text())
    assert config['num_classes'] == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=0).eval()
    backbone = timm.create_model('test_resnet', num_classes=0)
    backbone.load_state_dict(_load(run / 'last.pth.tar')['state_dict'])
    x, y = _digits('validation', 16)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone.eval()(x), atol=1e-5)
    bank = load_feature_bank(str(out / BANK_FILE))
    assert len(bank) == 200 and bank.dim == model.num_features

    from timm_adv.hub import write_model_card
    card = open(write_model_card(str(out), 'test-org/test_resnet.ssat')).read()
    assert 'kNN' in card and BANK_FILE in card and 'num_classes=0' in card

    common = ['--data-dir', str(digits_dir), '--img-size', '32', '--crop-pct', '1.0', '--num-samples', '100', '--knn-k', '20', '-b', '50', '--workers', '0', '--attack', 'pgd', '--eps', '0.1',
              '--steps', '4', '--attack-samples', '30']
    from_hub = validate.main(['--model', f'local-dir:{out}', '--knn', *common])
    from_ckpt = validate.main(['--model', 'test_resnet', '--checkpoint', str(run / 'last.pth.tar'), '--knn',
                               '--knn-bank-split', 'train', '--knn-bank-samples', '200', *common])
    # the exported bank is the training subset of the run: the same kNN either way
    assert from_hub['top1'] == from_ckpt['top1'] == pytest.approx(metrics['top1'], abs=1.0)
    assert {'pgd4_top1', 'knn_guided4_top1', 'knn_worst4_top1'} <= set(from_hub)
    assert from_hub['knn_guided4_top1'] < from_hub['attack_subset_top1']
    # the robust figure: per sample, robust only if neither attack succeeded
    assert from_hub['knn_worst4_top1'] <= min(from_hub['pgd4_top1'], from_hub['knn_guided4_top1'])


@pytest.mark.parametrize('argv,message', [
    (['--knn'], '--knn-bank FILE'),
    (['--knn', '--knn-bank-split', 'train', '--knn-bank-samples', '10', '--knn-k', '50'], '--knn-k 50'),
    (['--knn-bank-split', 'train'], '--knn-bank-split does nothing without --knn'),
    (['--knn-k', '10'], '--knn-k does nothing without --knn'),
    (['--knn', '--knn-bank-samples', '10'], '--knn-bank-samples does nothing without --knn --knn-bank-split'),
    (['--knn', '--knn-k', '0'], '--knn-k must be >= 1'),
    (['--knn-vote', 'count'], '--knn-vote does nothing without --knn'),
    (['--knn-bank-dtype', 'float16'], '--knn-bank-dtype does nothing without --knn'),
    (['--knn', '--knn-guide-mode', 'neighbours'], '--knn-guide-mode does nothing without --knn and --attack'),
])
def test_validate_knn_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        validate.main(['--model', 'test_resnet', '--no-pretrained', '--num-samples', '10', '--workers', '0', *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_validate_knn_bank_of_another_feature_size(tmp_path, capsys):
    path = str(tmp_path / 'bank.safetensors')
    save_feature_bank(FeatureBank(torch.randn(100, 7), torch.arange(100) % 10), path)
    with pytest.raises(SystemExit) as e:
        validate.main(['--model', 'test_resnet', '--no-pretrained', '--knn', '--knn-bank', path, '--num-samples', '10',
                       '--workers', '0'])
    assert e.value.code == 2 and '7-d features' in capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    (['--adv-method', 'ssat', '--adv-eps', '0'], '--adv-eps must be > 0'),
    (['--adv-method', 'contrastive', '--adv-eps', '0.1'], '--adv-eps does nothing with --adv-method contrastive'),
    (['--adv-method', 'ssat', '--mixup', '0.2'], 'without labels'),
    (['--adv-method', 'ssat', '--adv-targeted', 'random'], '--adv-targeted does nothing with --adv-method ssat'),
])
def test_train_bad_input(digits_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        _run(digits_dir, tmp_path, 'bad', '--epochs', '1', *argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


def test_stage2_without_stage1_warns(caplog):
    args, _ = train.parse_args([*FAST, '--adv-method', 'ssat'])
    args.dataset = 'bundled/mnist'
    args.num_classes = 10
    model = SSATTask.prepare_model(timm.create_model('test_resnet'), args)
    with caplog.at_level(logging.WARNING):
        task = SSATTask.from_args(model, None, args, mean=DATA_CONFIG['mean'], std=DATA_CONFIG['std'])
    assert 'without a stage-1 checkpoint' in caplog.text
    assert task.attack.attack.eps == pytest.approx(0.03) and task.attack.attack.step_size == pytest.approx(0.005)

"""validate.py against timm's validate.py: every flag, its meaning with the attacks, and bulk mode."""
import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from timm_adv.cli import validate
from timm_adv.data import BundledMnist, spread_subset
from timm_adv.evaluation import list_bulk_models
from timm_adv.hub import populate_hf_cache

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
REPO = os.path.dirname(os.path.dirname(DATA))
FAST = ['--num-samples', '16', '-b', '8', '--workers', '0']
PGD = ['--attack', 'pgd', '--eps', '0.1', '--steps', '2']


def test_parser_takes_every_timm_validate_flag():
    with open(os.path.join(DATA, 'timm_validate_flags.txt')) as f:
        timm_flags = [line.strip() for line in f if line.strip() and not line.startswith('#')]
    ours = set()
    for action in validate.build_parser()._actions:
        ours.update(action.option_strings or [action.dest])
    missing = [flag for flag in timm_flags if flag not in ours]
    assert not missing, f'timm validate.py flags our validate.py lacks: {missing}'
    assert len(timm_flags) == 60


def _trained_like(name='test_resnet', seed=0, **kwargs):
    """A 10-class model whose BN statistics and head are off their init values, so predictions vary."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(model.get_classifier().weight, std=0.5)
    return model.eval()


def _save_checkpoint(model, path):
    torch.save({'arch': 'test_resnet', 'state_dict': model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    return _save_checkpoint(_trained_like(), tmp_path_factory.mktemp('ckpt') / 'last.pth.tar')


def _run(*argv):
    return validate.main([*FAST, *argv])


def test_aot_autograd_clean_accuracy_like_eager(checkpoint):
    eager = _run('--model', 'test_resnet', '--checkpoint', checkpoint)
    fused = _run('--model', 'test_resnet', '--checkpoint', checkpoint, '--aot-autograd')
    assert fused['top1'] == eager['top1'] and fused['loss'] == pytest.approx(eager['loss'], abs=1e-4)


@pytest.mark.parametrize('flags', [['--torchcompile', 'aot_eager'], ['--torchscript']])
def test_compiled_and_scripted_models_are_attacked_like_eager(checkpoint, flags):
    eager = _run('--model', 'test_resnet', '--checkpoint', checkpoint, *PGD)
    assert eager['pgd2_top1'] < eager['top1']  # the attack acts on this model
    from torch._dynamo.utils import counters
    graphs = counters['stats']['unique_graphs']
    wrapped = _run('--model', 'test_resnet', '--checkpoint', checkpoint, *PGD, *flags)
    assert wrapped['top1'] == eager['top1'] and wrapped['loss'] == pytest.approx(eager['loss'], abs=1e-4)
    assert wrapped['pgd2_top1'] == eager['pgd2_top1']
    if '--torchcompile' in flags:  # one graph for the no-grad clean pass, one for the attack: no recompiles per step
        assert counters['stats']['unique_graphs'] - graphs == 2


def test_valid_labels_subset_every_evaluation(checkpoint, tmp_path):
    """--valid-labels P scores model[:, P]: the same numbers as a model whose head rows are permuted by P."""
    perm = [3, 7, 1, 9, 0, 5, 2, 8, 6, 4]
    (tmp_path / 'valid.txt').write_text('\n'.join(map(str, perm)) + '\n')
    model = _trained_like()
    head = model.get_classifier()
    head.weight.data, head.bias.data = head.weight.data[perm], head.bias.data[perm]
    permuted = _save_checkpoint(model, tmp_path / 'permuted.pth.tar')
    subset = _run('--model', 'test_resnet', '--checkpoint', checkpoint, '--valid-labels', str(tmp_path / 'valid.txt'),
                  *PGD)
    expected = _run('--model', 'test_resnet', '--checkpoint', permuted, *PGD)
    plain = _run('--model', 'test_resnet', '--checkpoint', checkpoint, *PGD)
    assert (subset['top1'], subset['pgd2_top1']) == (expected['top1'], expected['pgd2_top1'])
    assert subset['top1'] != plain['top1']


@pytest.fixture(scope='module')
def imagenet_named_digits(tmp_path_factory):
    """12 digits as an image folder whose files carry ImageNet validation names (ReaL labels look them up)."""
    root = tmp_path_factory.mktemp('real') / 'val'
    ds = spread_subset(BundledMnist('validation'), 12)
    labels = []
    for i in range(len(ds)):
        image, label = ds[i]
        os.makedirs(root / str(label), exist_ok=True)
        image.save(root / str(label) / f'ILSVRC2012_val_{i + 1:08d}.JPEG', format='JPEG', quality=95)
        labels.append(label)
    return root, labels


def test_real_labels_score_clean_and_attack(checkpoint, imagenet_named_digits, tmp_path):
    root, labels = imagenet_named_digits
    common = ['--model', 'test_resnet', '--checkpoint', checkpoint, '--data-dir', str(root), '--split', '',
              '--num-classes', '10', '--img-size', '32', '--crop-pct', '1.0', '-b', '4', '--workers', '0', *PGD]
    same = tmp_path / 'same.json'
    same.write_text(json.dumps([[label] for label in labels]))
    every = tmp_path / 'every.json'
    every.write_text(json.dumps([list(range(10))] * len(labels)))
    plain = validate.main(common)
    assert plain['top1'] < 100
    as_dataset = validate.main([*common, '--real-labels', str(same)])
    assert (as_dataset['top1'], as_dataset['top5'], as_dataset['pgd2_top1']) == \
        (plain['top1'], plain['top5'], plain['pgd2_top1'])
    # every class is right for every image: 100% clean and attacked, subset included
    lenient = validate.main([*common, '--real-labels', str(every), '--attack-samples', '6'])
    assert lenient['top1'] == lenient['attack_subset_top1'] == lenient['pgd2_top1'] == 100.0
    with pytest.raises(SystemExit):
        validate.main([*common, '--real-labels', str(tmp_path / 'same.json'), '--num-classes', '10',
                       '--dataset', 'bundled/mnist'])


def test_metrics_avg_micro_precision_is_accuracy(checkpoint):
    results = _run('--model', 'test_resnet', '--checkpoint', checkpoint, '--metrics-avg', 'micro')
    assert results['micro_precision'] == pytest.approx(results['top1'], abs=1e-3)
    assert results['micro_recall'] == pytest.approx(results['top1'], abs=1e-3)


def test_reparam_keeps_outputs_and_fuses_branches(tmp_path):
    model = _trained_like('mobileone_s0')
    path = str(tmp_path / 'm.pth.tar')
    torch.save({'state_dict': model.state_dict()}, path)
    plain = _run('--model', 'mobileone_s0', '--checkpoint', path, *PGD)
    fused = _run('--model', 'mobileone_s0', '--checkpoint', path, '--reparam', *PGD)
    assert fused['param_count'] < plain['param_count']
    assert fused['top1'] == plain['top1'] and fused['loss'] == pytest.approx(plain['loss'], rel=1e-3)
    assert fused['pgd2_top1'] == plain['pgd2_top1']


def test_input_size_flags_follow_timm(checkpoint, imagenet_named_digits):
    root, _ = imagenet_named_digits
    overlay = ("pretrained_cfg_overlay={'input_size': (3, 32, 32), 'test_input_size': (3, 48, 48), 'crop_pct': 1.0, "
               "'pool_size': (1, 1)}")
    common = ['--model', 'test_resnet', '--checkpoint', checkpoint, '--data-dir', str(root), '--split', '',
              '--num-classes', '10', '--workers', '0', '-b', '4', '--model-kwargs', overlay]
    assert validate.main(common)['img_size'] == 48  # timm evaluates at the test size
    assert validate.main([*common, '--use-train-size'])['img_size'] == 32
    # larger than the pretrained size: test-time pooling wraps the head, crop 1.0, and the attack runs through it
    pooled = validate.main([*common, '--img-size', '64', '--crop-pct', '0.5', '--test-pool', *PGD])
    assert pooled['img_size'] == 64 and pooled['crop_pct'] == 1.0 and 'pgd2_top1' in pooled


def test_model_dtype_runs_attacks_in_bfloat16(checkpoint):
    fp32 = _run('--model', 'test_resnet', '--checkpoint', checkpoint, *PGD)
    bf16 = _run('--model', 'test_resnet', '--checkpoint', checkpoint, *PGD, '--model-dtype', 'bfloat16')
    assert abs(bf16['top1'] - fp32['top1']) <= 12.5 and bf16['pgd2_top1'] < bf16['top1']


def test_naflex_loader_clean_accuracy(capsys):
    results = _run('--model', 'naflexvit_base_patch16_gap', '--no-pretrained', '--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2',
                   '--naflex-loader', '--naflex-max-seq-len', '16')
    assert results['samples'] == 16 and 0 <= results['top1'] <= 100
    with pytest.raises(SystemExit):
        _run('--model', 'test_resnet', '--no-pretrained', '--naflex-loader')
    assert 'only NaFlex models take' in capsys.readouterr().err


def test_retry_halves_the_batch_on_out_of_memory(checkpoint, monkeypatch):
    real = validate.evaluate_accuracy
    sizes = []

    def small_memory(model, loader, **kwargs):
        batch_size = getattr(loader, 'loader', loader).batch_size  # timm's PrefetchLoader wraps the DataLoader
        sizes.append(batch_size)
        if batch_size > 4:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return real(model, loader, **kwargs)

    monkeypatch.setattr(validate, 'evaluate_accuracy', small_memory)
    results = _run('--model', 'test_resnet', '--checkpoint', checkpoint, '--retry')
    assert sizes == [8, 6, 4] and results['samples'] == 16  # timm's decay_batch_step, then success
    with pytest.raises(RuntimeError):  # without --retry the error is the user's, as in timm
        _run('--model', 'test_resnet', '--checkpoint', checkpoint)


@pytest.mark.parametrize('argv, message', [
    (['--naflex-loader', *PGD], '--naflex-loader cannot be combined with --attack'),
    (['--real-labels', 'r.json', '--autoattack', 'standard'], '--real-labels cannot be combined with --autoattack'),
    (['--torchscript', '--knn'], '--torchscript cannot be combined with --knn'),
    (['--aot-autograd', *PGD], '--aot-autograd cannot be combined with --attack'),
    (['--valid-labels', 'v.txt', '--shift-dir', 'x', '--shift-type', 'sketch'], '--valid-labels cannot be combined'),
    (['--tf-preprocessing', '--no-prefetcher'], '--tf-preprocessing cannot be combined with --no-prefetcher'),
    (['--crop-border-pixels', '2', '--corruptions-generated'], '--crop-border-pixels cannot be combined'),
    (['--model-dtype', 'bfloat16', '--amp'], 'AMP needs a float32 model'),
    (['--fuser', 'te'], '--fuser does nothing without --torchscript'),
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode does nothing without --torchcompile'),
    (['--input-key', 'jpg'], '--input-key does nothing without a --dataset hfds/'),
    (['--input-img-mode', 'L'], '--input-img-mode does nothing without a timm dataset'),
    (['--naflex-max-seq-len', '64'], '--naflex-max-seq-len does nothing without --naflex-loader'),
    (['--torchscript', '--torchcompile'], 'not allowed with argument'),
])
def test_refused_combinations(argv, message, capsys):
    with pytest.raises(SystemExit):
        validate.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_optional_package_is_named(capsys):
    with pytest.raises(SystemExit):
        _run('--model', 'test_resnet', '--tf-preprocessing')
    assert 'tf-preprocessing needs tensorflow' in capsys.readouterr().err


# ---------------------------------------------------------------- bulk mode

def test_bulk_checkpoint_folder_one_row_per_checkpoint(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    for i in range(2):
        _save_checkpoint(_trained_like(seed=i), folder / f'checkpoint-{i}.pth.tar')
    rows = _run('--model', 'test_resnet', '--checkpoint', str(folder), *PGD, '--results-file', str(tmp_path / 'r.csv'))
    assert sorted(os.path.basename(r['checkpoint']) for r in rows) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar']
    assert rows[0]['top1'] >= rows[1]['top1'] and all('pgd2_top1' in r for r in rows)
    single = _run('--model', 'test_resnet', '--checkpoint', rows[0]['checkpoint'], *PGD)
    assert (single['top1'], single['pgd2_top1']) == (rows[0]['top1'], rows[0]['pgd2_top1'])
    with open(tmp_path / 'r.csv') as f:
        written = list(csv.DictReader(f))
    assert [r['checkpoint'] for r in written] == [r['checkpoint'] for r in rows] and 'pgd2_top1' in written[0]


def test_bulk_model_list_file_survives_a_bad_model(tmp_path, capsys):
    names = []
    for i, arch in enumerate(('test_resnet', 'test_efficientnet_gn')):
        folder = tmp_path / arch
        save_for_hf(_trained_like(arch, seed=i), str(folder))
        names.append(f'local-dir:{folder}')
    (tmp_path / 'models.txt').write_text('\n'.join([names[0], 'no_such_model', '', names[1]]) + '\n')
    rows = _run('--model', str(tmp_path / 'models.txt'), '--img-size', '32', *PGD,
                '--results-file', str(tmp_path / 'r.json'), '--results-format', 'json')
    assert sorted(r['model'] for r in rows) == sorted(names)
    assert all({'top1', 'pgd2_top1', 'attack_samples', 'param_count'} <= set(r) for r in rows)
    assert 'no_such_model failed: Unknown model' in capsys.readouterr().err
    assert json.load(open(tmp_path / 'r.json')) == rows


def test_bulk_wildcard_over_pretrained_models_offline(tmp_path):
    """``--model 'test_efficientnet_[gl]n*' --pretrained``: timm's glob over pretrained tags, weights from an
    offline Hub cache (random weights stand in for the published ones)."""
    cache = tmp_path / 'hf' / 'hub'
    for i, name in enumerate(('test_efficientnet_gn.r160_in1k', 'test_efficientnet_ln.r160_in1k')):
        folder = tmp_path / name
        torch.manual_seed(i)
        save_for_hf(timm.create_model(name), str(folder))
        populate_hf_cache(str(folder), f'timm/{name}', str(cache))
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    env.pop('HF_HUB_CACHE', None)
    run = subprocess.run([sys.executable, 'validate.py', '--model', 'test_efficientnet_[gl]n*', '--pretrained', *FAST,
                          '--img-size', '32', *PGD, '--results-file', str(tmp_path / 'r.csv')],
                         env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / 'r.csv') as f:
        rows = list(csv.DictReader(f))
    assert sorted(r['model'] for r in rows) == ['test_efficientnet_gn.r160_in1k', 'test_efficientnet_ln.r160_in1k']
    assert all(r['pgd2_top1'] and r['top1'] for r in rows)


def test_bulk_model_selection_follows_timm(tmp_path):
    names = [name for name, _ in list_bulk_models('all')]
    assert 'resnet50.a1_in1k' in names and not any(n.endswith(('_in21k', '_in22k')) for n in names)
    assert list_bulk_models('test_resnet*') == [('test_resnet.r160_in1k', '')]
    assert list_bulk_models('test_resnet') == [] and list_bulk_models('local-dir:/x') == []  # single-model runs
    (tmp_path / 'empty.txt').write_text('\n')
    with pytest.raises(ValueError, match='model list file is empty'):
        list_bulk_models(str(tmp_path / 'empty.txt'))
    with pytest.raises(FileNotFoundError, match='without'):
        list_bulk_models('test_resnet', str(tmp_path))

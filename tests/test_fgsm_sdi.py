"""FGSM-SDI: the generator, the task, checkpointing and resume through train.py."""
import contextlib
import copy
import csv
import logging
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
from timm_adv.models import SDIGenerator, create_sdi_generator
from timm_adv.tasks import FGSMSDITask, get_method
from timm_adv.tasks.fgsm_sdi import smooth_targets, smoothed_cross_entropy
from timm_adv.utils import read_checkpoint

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EPS = 8 / 255


def _sdi_task(num_classes=10, every=20, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model('test_resnet', num_classes=num_classes)
    attack = create_attack(EPS, steps=1, random_start=False, bn_mode='train', mean=MEAN, std=STD)
    task = FGSMSDITask(model, nn.CrossEntropyLoss(), attack, create_sdi_generator(EPS, in_chans=3),
                       generator_every=every, verbose=False, **kwargs)
    task.train()
    return task


def _batch(n=8, num_classes=10, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_pix = torch.rand(n, 3, size, size, generator=g)
    x = (x_pix - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.randint(0, num_classes, (n,), generator=g)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return sorted(k for k, v in module.state_dict().items() if not torch.equal(before[k], v))


@pytest.mark.parametrize('in_chans,hw', [(1, (28, 28)), (3, (32, 32)), (4, (9, 13))])
def test_generator_output_bounded_by_eps_for_any_input(in_chans, hw):
    gen = SDIGenerator(eps=EPS, in_chans=in_chans)
    x = torch.randn(4, in_chans, *hw) * 1e3  # extreme inputs saturate tanh
    sign = torch.randn_like(x).sign()
    for mode in (True, False):
        gen.train(mode)
        out = gen(x, sign)
        assert out.shape == x.shape
        assert out.abs().max() <= EPS
        assert out.abs().max() > 0.5 * EPS  # a real perturbation, not a constant zero
    with pytest.raises(ValueError, match='--in-chans'):
        gen(torch.randn(2, in_chans + 1, *hw), torch.randn(2, in_chans + 1, *hw))


def test_generator_step_increases_classifier_loss_on_fixed_batch():
    task = _sdi_task()
    x, y = _batch(8)
    x_pix = task.attack.normalizer.to_pixel(x)
    grad_sign = torch.randn_like(x).sign()

    def loss_now():
        task.generator.train()  # the mode the generator is optimised in (BN on batch statistics)
        with torch.no_grad():
            delta0 = task.initial_perturbation(x, x_pix, grad_sign)
        return task.adversarial_loss(task.unwrapped_model, x_pix, delta0, y)[0].item()

    before = loss_now()
    for _ in range(5):
        task.generator_step(x, x_pix, grad_sign, y)
    after = loss_now()
    assert after > before + 1e-3, (before, after)


def test_generator_step_changes_only_generator_and_model_step_only_model():
    task = _sdi_task(every=2)
    model, gen = task.unwrapped_model, task.generator
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(8)

    # batch 0: generator step (inside forward) then the model's loss
    model_before, gen_before = _snapshot(model), _snapshot(gen)
    result = task(x, y)
    assert all(p.grad is None for p in model.parameters()), 'generator step touched the model .grad'
    changed_gen = _changed(gen_before, gen)
    assert any(k.endswith('weight') for k in changed_gen)
    model_params = {k for k, _ in model.named_parameters()}
    assert not model_params & set(_changed(model_before, model)), 'model weights moved during the forward'

    gen_before = _snapshot(gen)
    result['loss'].backward()
    assert all(p.grad is None for p in gen.parameters()), 'model loss reached the generator'
    optimizer.step()
    optimizer.zero_grad()
    assert model_params & set(_changed(model_before, model))
    assert not _changed(gen_before, gen)

    # batch 1: no generator step at all
    gen_before = _snapshot(gen)
    task(x, y)['loss'].backward()
    assert not _changed(gen_before, gen)
    assert all(p.grad is None for p in gen.parameters())


def test_attack_passes_leave_running_stats_but_official_mode_updates_them():
    x, y = _batch(8)
    for bn_mode, expect_attack_updates in (('train', False), ('train_update', True)):
        task = _sdi_task(every=1000)
        task.batches_seen = 1  # no generator step on this batch
        task.attack.bn_mode = bn_mode
        bn = task.unwrapped_model.bn1
        before = bn.num_batches_tracked.item()
        task(x, y)
        # the training forward always counts one batch; the two attack passes add two in the official mode
        assert bn.num_batches_tracked.item() - before == (3 if expect_attack_updates else 1)


@pytest.mark.parametrize('num_classes', [10, 100])
def test_label_smoothing_any_class_count(num_classes):
    y = torch.tensor([0, num_classes - 1, 3])
    probs = smooth_targets(y, num_classes, 0.5)
    assert probs.shape == (3, num_classes)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.allclose(probs[torch.arange(3), y], torch.full((3,), 0.5))
    others = probs.clone()
    others[torch.arange(3), y] = 0
    assert torch.allclose(others.sum(1), torch.full((3,), 0.5))
    assert torch.allclose(others[0, 1:], torch.full((num_classes - 1,), 0.5 / (num_classes - 1)))
    # soft (mixup) targets: a one-hot soft target gives the same result
    assert torch.allclose(smooth_targets(F.one_hot(y, num_classes).float(), num_classes, 0.5), probs)
    logits = torch.randn(3, num_classes)
    expected = -(probs * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(smoothed_cross_entropy(logits, y, 0.5), expected)
    # confidence 1 is plain cross-entropy
    assert torch.allclose(smoothed_cross_entropy(logits, y, 1.0), F.cross_entropy(logits, y))


def _model_inputs(task):
    """Records every (pixel-space) batch the classifier sees, in call order."""
    seen = []
    hook = task.unwrapped_model.register_forward_pre_hook(
        lambda m, inputs: seen.append(task.attack.normalizer.to_pixel(inputs[0].detach())))
    return seen, hook


def _reference_input_gradient(task, x_pix, delta, y):
    """The CE input gradient at ``x + delta`` of a copy of the model in train mode (batch statistics)."""
    model = copy.deepcopy(task.unwrapped_model).train()
    d = delta.clone().requires_grad_(True)
    loss = F.cross_entropy(model(task.attack.normalizer.from_pixel(x_pix + d)), y, reduction='sum')
    return torch.autograd.grad(loss, d)[0]


def test_generator_receives_sign_of_the_real_input_gradient():
    task = _sdi_task(every=1)
    x, y = _batch(8)
    x_pix = task.attack.normalizer.to_pixel(x)
    expected = _reference_input_gradient(task, x_pix, torch.zeros_like(x_pix), y).sign()
    received = []
    hook = task.generator.register_forward_pre_hook(lambda m, inputs: received.append(inputs))
    task(x, y)  # batch 0: the generator step and the perturbation both read the gradient sign
    hook.remove()
    assert len(received) == 2
    for image, grad_sign in received:
        assert torch.equal(image, x)  # the model's (normalised) input, as in the official code
        assert (grad_sign != 0).float().mean() > 0.99
        assert torch.equal(grad_sign, expected)


@pytest.mark.parametrize('step_ratio', [0.75, 2.0])
def test_perturbation_is_clip_of_delta0_plus_alpha_sign_grad(step_ratio, caplog):
    num_classes = 100  # and the smoothed CE generalises to any class count
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=num_classes)
    attack = create_attack(EPS, steps=1, step_size=step_ratio * EPS, random_start=False, bn_mode='train',
                           mean=MEAN, std=STD)
    with caplog.at_level(logging.WARNING):
        task = FGSMSDITask(model, None, attack, create_sdi_generator(EPS, in_chans=3), verbose=False)
    assert ('larger than eps' in caplog.text) is (step_ratio > 1)
    task.train()
    task.batches_seen = 1  # no generator step on this batch
    x, y = _batch(8, num_classes=num_classes)
    x_pix = task.attack.normalizer.to_pixel(x)
    raw = []
    hook = task.generator.register_forward_hook(lambda m, inputs, output: raw.append(output.detach()))
    seen, model_hook = _model_inputs(task)
    out = task(x, y)
    hook.remove(), model_hook.remove()
    delta0 = (x_pix + raw[0]).clamp(0, 1) - x_pix  # generator output kept in the [0, 1] box
    assert torch.allclose(seen[1], x_pix + delta0, atol=1e-6)  # the FGSM step starts at x + delta0
    grad = _reference_input_gradient(task, x_pix, delta0, y)
    alpha = min(step_ratio, 1.0) * EPS  # a step above eps is capped, and the warning said so
    expected = (x_pix + (delta0 + alpha * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    assert torch.allclose(seen[-1], expected, atol=1e-6)
    unclipped = (delta0 + alpha * grad.sign()).abs() > EPS
    assert unclipped.any()  # the eps clip was exercised
    assert torch.allclose(out['loss'], smoothed_cross_entropy(out['output'], y, 0.5))
    probs = smooth_targets(y, num_classes, 0.5)
    assert torch.allclose(out['loss'], -(probs * out['output'].log_softmax(1)).sum(1).mean())


def test_generator_architecture_and_cli_defaults():
    args, _ = train.parse_args(['--adv-method', 'fgsm-sdi'])
    task = get_method('fgsm-sdi').from_args(timm.create_model('test_resnet', num_classes=10), None, args,
                                            mean=MEAN, std=STD)
    assert task.generator_every == 20 and task.label_confidence == 0.5
    group = task.generator_optimizer.param_groups[0]
    assert isinstance(task.generator_optimizer, torch.optim.Adam) and (group['lr'], group['weight_decay']) == (1e-3, 5e-4)
    a = task.attack
    assert a.eps == pytest.approx(8 / 255) and a.step_size == pytest.approx(8 / 255)  # alpha = eps
    assert (a.steps, a.norm, a.random_start, a.clamp, a.bn_mode) == (1, 'linf', False, True, 'train')

    g = task.generator
    conv, bn, act = g.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (6, 64, (3, 3), (1, 1))
    assert isinstance(bn, nn.BatchNorm2d) and bn.affine and isinstance(act, nn.ReLU)
    b = g.block
    assert not b.bn1.affine and not b.bn2.affine and isinstance(b.act1, nn.PReLU) and isinstance(b.act2, nn.PReLU)
    assert b.conv1.in_channels == b.conv2.out_channels == 64 and b.conv1.kernel_size == (3, 3)
    assert isinstance(g.norm, nn.BatchNorm2d) and not g.norm.affine
    assert (g.head.in_channels, g.head.out_channels, g.head.kernel_size) == (64, 3, (3, 3))
    x, _ = _batch(2)
    sign = torch.randn_like(x).sign()
    g.eval()
    h = g.stem(torch.cat([x, sign], 1))
    h = h + b.conv2(b.act2(b.bn2(b.conv1(b.act1(b.bn1(h))))))  # pre-activation residual block
    assert torch.allclose(g(x, sign), torch.tanh(g.head(g.norm(h))) * 8 / 255, atol=1e-7)


def test_no_adv_sdi_clamp_lets_images_leave_the_box():
    x_pix = torch.full((4, 3, 32, 32), 0.995)  # bright images: a positive step leaves [0, 1]
    x = (x_pix - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.arange(4)
    tops = {}
    for flags in ([], ['--no-adv-sdi-clamp']):
        args, _ = train.parse_args(['--adv-method', 'fgsm-sdi', *flags])
        torch.manual_seed(0)
        task = get_method('fgsm-sdi').from_args(timm.create_model('test_resnet', num_classes=10), None, args,
                                                mean=MEAN, std=STD)
        task.verbose = False
        task.train()
        task.batches_seen = 1
        seen, hook = _model_inputs(task)
        task(x, y)
        hook.remove()
        assert task.attack.clamp is (not flags)
        assert (seen[-1] - x_pix).abs().max() <= 8 / 255 + 1e-6
        tops[bool(flags)] = seen[-1].max().item()
    assert tops[False] <= 1.0 + 1e-6 and tops[True] > 1.0 + 1 / 255


def test_generator_step_runs_in_fp32_under_fp16_autocast():
    x, y = _batch(8)
    grad_sign = torch.randn_like(x).sign()

    def generator_grads(autocast_dtype):
        task = _sdi_task(every=1)
        x_pix = task.attack.normalizer.to_pixel(x)
        grads, conv_dtypes = [], []
        task.generator_optimizer.step = lambda: grads.append([p.grad.clone() for p in task.generator.parameters()])
        hook = task.unwrapped_model.conv1.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
        with torch.autocast('cpu', dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            task.generator_step(x, x_pix, grad_sign, y)
        hook.remove()
        return grads[0], set(conv_dtypes)

    ref, ref_dtypes = generator_grads(None)
    fp16, fp16_dtypes = generator_grads(torch.float16)
    bf16, bf16_dtypes = generator_grads(torch.bfloat16)
    assert ref_dtypes == fp16_dtypes == {torch.float32}  # fp16 would pass unscaled gradients to the generator
    # bf16 needs no loss scaling: autocast stays on for the generator's loss; its FGSM step is an attack pass,
    # in fp32 as every attack pass (the attack core's precision, --adv-attack-amp to keep the autocast)
    assert bf16_dtypes == {torch.bfloat16, torch.float32}
    for a, b in zip(ref, fp16):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(ref, bf16))


def test_sdi_adversarial_example_in_ball_and_box():
    task = _sdi_task()
    x, y = _batch(6)
    x_pix = task.attack.normalizer.to_pixel(x)
    task.generator.eval()
    grad_sign = torch.randn_like(x).sign()
    delta0 = task.initial_perturbation(x, x_pix, grad_sign)
    assert (x_pix + delta0).min() >= 0 and (x_pix + delta0).max() <= 1
    captured = {}

    def capture(module, inputs):
        captured['x'] = task.attack.normalizer.to_pixel(inputs[0].detach())

    handle = task.unwrapped_model.register_forward_pre_hook(capture)
    task.adversarial_loss(task.unwrapped_model, x_pix, delta0.detach(), y)
    handle.remove()
    delta = captured['x'] - x_pix
    assert delta.abs().max() <= EPS + 1e-6
    assert captured['x'].min() >= -1e-6 and captured['x'].max() <= 1 + 1e-6
    assert delta.abs().max() > 0.9 * EPS  # the FGSM step moved away from delta0


def test_sdi_bad_flags_fail_early():
    model = timm.create_model('test_resnet', num_classes=10)
    two_step = create_attack(EPS, steps=2, bn_mode='train')
    with pytest.raises(ValueError, match='--adv-steps'):
        FGSMSDITask(model, None, two_step, create_sdi_generator(EPS))
    one_step = create_attack(EPS, steps=1, random_start=False, bn_mode='train')
    with pytest.raises(ValueError, match='--adv-sdi-every'):
        FGSMSDITask(model, None, one_step, create_sdi_generator(EPS), generator_every=0)
    with pytest.raises(ValueError, match='--adv-sdi-label-confidence'):
        FGSMSDITask(model, None, one_step, create_sdi_generator(EPS), label_confidence=1.5)


def test_from_args_builds_the_attack_it_needs_instead_of_changing_it(monkeypatch):
    built = []
    make = FGSMSDITask.attack_from_args.__func__

    def recorded(cls, *args, **kwargs):
        attack = make(cls, *args, **kwargs)
        built.append((attack, dict(vars(attack))))
        return attack

    monkeypatch.setattr(FGSMSDITask, 'attack_from_args', classmethod(recorded))
    args, _ = train.parse_args(['--adv-method', 'fgsm-sdi', '--no-adv-sdi-clamp'])
    task = FGSMSDITask.from_args(timm.create_model('test_resnet', num_classes=10), None, args, mean=MEAN, std=STD)
    (attack, settings), = built
    assert task.attack is attack and not attack.clamp
    assert vars(attack) == settings  # nothing was changed on the attack once built


def test_task_state_round_trip_restores_generator_and_its_optimizer(tmp_path):
    task = _sdi_task(every=1)
    x, y = _batch(8)
    for _ in range(3):
        task(x, y)
    path = tmp_path / 'state.pth'
    torch.save(task.get_task_state(), path)
    state = torch.load(path, weights_only=True)
    fresh = _sdi_task(every=1, seed=5)
    fresh.unwrapped_model.load_state_dict(task.unwrapped_model.state_dict())
    fresh.load_task_state(state)
    assert fresh.batches_seen == 3
    for k, v in task.generator.state_dict().items():
        assert torch.equal(v, fresh.generator.state_dict()[k]), k
    a, b = task.generator_optimizer.state_dict(), fresh.generator_optimizer.state_dict()
    assert a['state'].keys() == b['state'].keys() and a['state']
    for i in a['state']:
        assert torch.equal(a['state'][i]['exp_avg'], b['state'][i]['exp_avg'])
    # one more identical step keeps both in lock-step
    task(x, y), fresh(x, y)
    for k, v in task.generator.state_dict().items():
        assert torch.allclose(v, fresh.generator.state_dict()[k]), k
    assert task.get_task_state(ema=True) == {}


# --- train.py end to end: checkpoint / resume of the generator and both optimisers ----------------------------


@pytest.fixture(scope='module')
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('digits')
    rng = np.random.RandomState(0)
    for split, per_class in (('train', 4), ('validation', 2)):
        for c in range(10):
            os.makedirs(root / split / str(c))
            for i in range(per_class):
                img = (rng.rand(28, 28) * 60 + c * 19).astype(np.uint8)  # class-dependent brightness
                Image.fromarray(img, mode='L').convert('RGB').save(root / split / str(c) / f'{i}.png')
    return root


def _train_args(data, out, experiment, epochs, *extra):
    return [
        '--data-dir', str(data), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '32',
        '--adv-method', 'fgsm-sdi', '--adv-eps', '0.1', '--adv-sdi-every', '3', '--epochs', str(epochs),
        '--sched', 'step', '--decay-epochs', '100', '--warmup-epochs', '0', '--no-aug', '-b', '8', '--lr', '0.05',
        '--workers', '0', '--seed', '3', '--adv-val-samples', '8', '--adv-val-steps', '2',
        '--output', str(out), '--experiment', experiment, '--log-interval', '100', *extra,
    ]


def test_train_resume_restores_generator_and_both_optimizers(tiny_folder, tmp_path):
    train.main(_train_args(tiny_folder, tmp_path, 'full', 2))
    train.main(_train_args(tiny_folder, tmp_path, 'part', 1))
    part_last = tmp_path / 'part' / 'last.pth.tar'
    ckpt = read_checkpoint(str(part_last))
    state = ckpt['task_state']
    assert state['batches_seen'] == 5  # 40 images / batch 8
    assert state['generator_optimizer']['state'], 'generator Adam state missing'
    assert not any('generator' in k for k in ckpt['state_dict']), 'generator leaked into the model weights'
    assert ckpt['optimizer']['state'], 'model optimizer state missing'

    train.main(_train_args(tiny_folder, tmp_path, 'part', 2, '--resume', str(part_last)))
    full = read_checkpoint(str(tmp_path / 'full' / 'last.pth.tar'))
    resumed = read_checkpoint(str(part_last))
    assert resumed['epoch'] == full['epoch'] == 1
    for key in ('state_dict',):
        for k, v in full[key].items():
            assert torch.allclose(v.float(), resumed[key][k].float(), atol=1e-6), k
    for k, v in full['task_state']['generator'].items():
        assert torch.allclose(v.float(), resumed['task_state']['generator'][k].float(), atol=1e-6), k
    assert resumed['task_state']['batches_seen'] == 10
    gen_a = full['task_state']['generator_optimizer']['state']
    gen_b = resumed['task_state']['generator_optimizer']['state']
    assert all(torch.allclose(gen_a[i]['exp_avg_sq'], gen_b[i]['exp_avg_sq'], atol=1e-9) for i in gen_a)

    with open(tmp_path / 'part' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert {'eval_guard_pgd_top1', 'eval_guard_fgsm_top1', 'eval_co_detected'} <= set(rows[0])

    # --no-resume-opt: weights and generator come back, neither optimiser's state does
    args, _ = train.parse_args(_train_args(tiny_folder, tmp_path, 'part', 3, '--resume', str(part_last),
                                           '--no-resume-opt'))
    state = train.setup(args)
    task = state.task
    assert state.start_epoch == 2 and not state.optimizer.state and not task.generator_optimizer.state
    for k, v in resumed['task_state']['generator'].items():
        assert torch.equal(v, task.generator.state_dict()[k]), k

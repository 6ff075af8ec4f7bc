"""Adversarial distillation (--kd-* flags on an --adv-method): the loss, the attack's target, the frozen
teacher, checkpoints, resume, export and refused combinations."""
import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import save_for_hf

from timm_adv.tasks import add_adv_args, check_adv_args, create_task
from timm_adv.utils import explicit_args

NUM_CLASSES = 10
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # student statistics differ from the teacher's (ImageNet)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_adv_args(parser)
    args = parser.parse_args(argv)
    args.num_classes = NUM_CLASSES
    check_adv_args(args, explicit_args(parser, argv))
    return args


def _model(seed):
    torch.manual_seed(seed)
    return timm.create_model('test_resnet', num_classes=NUM_CLASSES)


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
    """A test_resnet teacher saved the way the Hub stores timm models (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp('teacher')
    save_for_hf(_model(1), str(path), safe_serialization=True)
    return path


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, 32, 32, generator=g)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std, torch.arange(n) % NUM_CLASSES


def _kl_by_hand(student_logits, teacher_logits, t):
    p_t = torch.softmax(teacher_logits / t, dim=1)
    log_p_s = torch.log_softmax(student_logits / t, dim=1)
    return (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean() * t * t


def test_ard_loss_attack_and_frozen_teacher(teacher_dir):
    argv = ['--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '2', '--no-adv-random-start',
            '--kd-model-name', f'local-dir:{teacher_dir}', '--kd-temperature', '3', '--distill-loss-weight', '0.7',
            '--task-loss-weight', '0.4']
    student = _model(0)
    task = create_task(student, torch.nn.CrossEntropyLoss(), _parse(argv), mean=MEAN, std=STD)
    task.train()
    assert not task.teacher.training and task.unwrapped_model.training
    x, y = _batch()

    seen = []
    student.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    teacher_seen = []
    task.teacher.model.register_forward_pre_hook(lambda m, a: teacher_seen.append(a[0].detach().clone()))
    result = task(x, y)
    trained = seen[-1]  # the batch of the final, trained forward

    # the attack is against the student: the same PGD run on the student alone gives the trained batch
    x_adv = task.attack(student, x, y)
    assert torch.allclose(trained, x_adv, atol=1e-6)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    delta = (x_adv - x) * std
    assert delta.abs().max() <= 0.1 + 1e-5 and delta.abs().max() > 0.05

    # the teacher saw the clean batch once, re-normalised to its own (ImageNet) statistics
    reference = timm.create_model(f'local-dir:{teacher_dir}', pretrained=True, num_classes=NUM_CLASSES).eval()
    imagenet_mean = torch.tensor(reference.pretrained_cfg['mean']).view(1, 3, 1, 1)
    imagenet_std = torch.tensor(reference.pretrained_cfg['std']).view(1, 3, 1, 1)
    x_teacher = (x * std + mean - imagenet_mean) / imagenet_std
    assert len(teacher_seen) == 1 and torch.allclose(teacher_seen[0], x_teacher, atol=1e-6)

    # loss = 0.4 * CE(student(x_adv), y) + 0.7 * T^2 KL(teacher(x) || student(x_adv)), computed independently
    with torch.no_grad():
        s_logits = student(x_adv)
        t_logits = reference(x_teacher)
    ce = F.cross_entropy(s_logits, y)
    kd = _kl_by_hand(s_logits, t_logits, 3.0)
    assert torch.allclose(result['task_loss'], ce, atol=1e-5)
    assert torch.allclose(result['kd_loss'], kd, atol=1e-5)
    assert torch.allclose(result['loss'], 0.4 * ce + 0.7 * kd, atol=1e-5)

    result['loss'].backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    saved = task.get_checkpoint_state()
    assert set(saved['state_dict']) == set(student.state_dict())
    assert not saved.get('task_state')


@pytest.mark.parametrize('argv, message', [
    (['--kd-temperature', '2', '--distill-loss-weight', '1'],
     '--kd-temperature, --distill-loss-weight do nothing without --kd-model-name'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-distill-type', 'feature'], 'pre-logit features'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-distill-type', 'token'], '(cls, dist) pair'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-token-distill-type', 'hard'],
     '--kd-token-distill-type applies to --kd-distill-type token'),
    (['--adv-method', 'ssat', '--kd-model-name', 'x'], 'trains a representation'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-loss-type', 'mse'], 'only kl'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-temperature', '0'], '--kd-temperature must be > 0'),
])
def test_bad_combinations_are_refused(argv, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        _parse(argv)


def test_train_resume_and_export_hold_the_student_only(image_folder, teacher_dir, tmp_path):
    import train
    from timm_adv.hub import export_checkpoint
    from timm_adv.utils import read_checkpoint
    argv = ['--data-dir', str(image_folder), '--model', 'test_resnet', '--num-classes', str(NUM_CLASSES),
            '--img-size', '32', '-b', '8', '--lr', '0.05', '--warmup-epochs', '0', '--workers', '0', '--no-aug',
            '--adv-val-samples', '8', '--adv-val-steps', '1', '--output', str(tmp_path), '--experiment', 'run',
            '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1',
            '--kd-model-name', f'local-dir:{teacher_dir}', '--task-loss-weight', '0.5']
    train.main([*argv, '--epochs', '1'])
    ckpt = read_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))
    plain_keys = set(_model(0).state_dict())
    assert set(ckpt['state_dict']) == plain_keys and not ckpt.get('task_state')
    assert ckpt['args'].kd_model_name == f'local-dir:{teacher_dir}'

    # resume rebuilds the teacher from the flags and goes on from the saved epoch
    train.main([*argv, '--epochs', '2', '--resume', str(tmp_path / 'run' / 'last.pth.tar')])
    resumed = read_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))
    assert resumed['epoch'] == 1 and set(resumed['state_dict']) == plain_keys
    summary = (tmp_path / 'run' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 3 and 'train_kd_loss' in summary[0]

    exported, _ = export_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'), str(tmp_path / 'export'))
    assert set(load_file(str(tmp_path / 'export' / 'model.safetensors'))) == plain_keys
    timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True)  # a plain timm model


def test_teacher_weights_from_a_file(teacher_dir):
    from timm_adv.tasks.distill import create_teacher
    args = _parse(['--adv-method', 'pgd', '--kd-model-name', 'test_resnet',
                   '--kd-pretrained-path', str(teacher_dir / 'model.safetensors')])
    teacher = create_teacher(args, _model(0))
    expected = load_file(str(teacher_dir / 'model.safetensors'))
    assert all(torch.equal(v, expected[k]) for k, v in teacher.model.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_missing_teacher_names_the_flag_and_the_offline_fix(tmp_path):
    from timm_adv.tasks.distill import create_teacher
    args = _parse(['--adv-method', 'pgd', '--kd-model-name', f'local-dir:{tmp_path / "absent"}'])
    with pytest.raises(RuntimeError, match='--kd-model-name local-dir:.*local-dir:DIR, or give --kd-pretrained-path'):
        create_teacher(args, _model(0))

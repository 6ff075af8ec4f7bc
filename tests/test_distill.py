"""Adversarial distillation (--kd-* flags on an --adv-method): the loss, the attack's target, the frozen
teacher, checkpoints, resume, export and refused combinations."""
import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import save_for_hf
from timm.task import DistillationTeacher

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
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-token-distill-type', 'hard'],
     '--kd-token-distill-type applies to --kd-distill-type token, not logit'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-distill-type', 'token', '--kd-teacher-feature-dim', '8'],
     '--kd-teacher-feature-dim applies to --kd-distill-type feature, not token'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-distill-type', 'feature', '--kd-temperature', '2'],
     '--kd-temperature does nothing with --kd-distill-type feature'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-distill-type', 'token', '--kd-token-distill-type', 'hard',
      '--kd-temperature', '2'], '--kd-temperature does nothing with --kd-distill-type token --kd-token-distill-type'),
    (['--adv-method', 'ssat', '--kd-model-name', 'x'], 'trains a representation'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-loss-type', 'mse'], 'only kl'),
    (['--adv-method', 'pgd', '--kd-model-name', 'x', '--kd-temperature', '0'], '--kd-temperature must be > 0'),
])
def test_bad_combinations_are_refused(argv, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        _parse(argv)


def test_train_resume_and_export_hold_the_student_only(image_folder, teacher_dir, tmp_path):
    from timm_adv.cli import train
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
    with pytest.raises(ValueError, match='--kd-model-name local-dir:.*local-dir:DIR, or give --kd-pretrained-path'):
        create_teacher(args, _model(0))


@pytest.fixture(scope='module')
def wide_teacher_dir(tmp_path_factory):
    """A test_efficientnet teacher: 256 pooled features against the test_resnet student's 96."""
    path = tmp_path_factory.mktemp('wide_teacher')
    torch.manual_seed(2)
    save_for_hf(timm.create_model('test_efficientnet', num_classes=NUM_CLASSES), str(path), safe_serialization=True)
    return path


def _teacher_input(x, teacher):
    """``x`` re-normalised from the student's statistics to the teacher's."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    t_mean = torch.tensor(teacher.pretrained_cfg['mean']).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.pretrained_cfg['std']).view(1, 3, 1, 1)
    return (x * std + mean - t_mean) / t_std


def _distilled_task(student, argv):
    from timm_adv.tasks.distill import prepare_kd_model
    args = _parse(argv)
    student = prepare_kd_model(student, args)
    return create_task(student, torch.nn.CrossEntropyLoss(), args, mean=MEAN, std=STD).train()


def _check_attack_on_student(task, student, x, y, trained):
    x_adv = task.attack(student, x, y)
    assert torch.allclose(trained, x_adv, atol=1e-6)
    delta = (x_adv - x) * torch.tensor(STD).view(1, 3, 1, 1)
    assert 0.05 < delta.abs().max() <= 0.1 + 1e-5
    return x_adv


@pytest.mark.parametrize('method', ['pgd', 'fgsm-rs'])
def test_feature_distillation_loss_projection_state_and_export(wide_teacher_dir, method):
    from timm_adv.tasks.distill import KD_PROJECTION_KEY
    argv = ['--adv-method', method, '--adv-eps', '0.1', '--kd-model-name', f'local-dir:{wide_teacher_dir}',
            '--kd-distill-type', 'feature', '--distill-loss-weight', '0.3']
    argv += ['--adv-steps', '2', '--no-adv-random-start'] if method == 'pgd' else []
    student = _model(0)
    task = _distilled_task(student, argv)
    projection = getattr(student, KD_PROJECTION_KEY)
    assert (projection.in_features, projection.out_features) == (96, 256)
    x, y = _batch()
    seen = []
    student.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    torch.manual_seed(3)
    result = task(x, y)
    x_adv = seen[-1]
    if method == 'pgd':
        _check_attack_on_student(task, student, x, y, x_adv)
    else:  # random start: the trained batch is still an eps-ball perturbation of x
        assert ((x_adv - x) * torch.tensor(STD).view(1, 3, 1, 1)).abs().max() <= 0.1 + 1e-5

    # kd = MSE(projection(student pooled pre-logits on x_adv), teacher pooled pre-logits on clean x)
    reference = timm.create_model(f'local-dir:{wide_teacher_dir}', pretrained=True, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        s_feat = student.forward_head(student.forward_features(x_adv), pre_logits=True)
        t_feat = reference.forward_head(reference.forward_features(_teacher_input(x, reference)), pre_logits=True)
        ce = F.cross_entropy(student.fc(s_feat), y)
    kd = ((projection(s_feat) - t_feat) ** 2).mean()
    assert torch.allclose(result['kd_loss'], kd, atol=1e-5)
    assert torch.allclose(result['task_loss'], ce, atol=1e-5)
    assert torch.allclose(result['loss'], ce + 0.3 * kd, atol=1e-5)

    # the projection trains with the student (it is in the student's parameters, hence the optimiser)
    result['loss'].backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert any(p is projection.weight for p in student.parameters())

    # checkpoints keep it in task_state; a fresh task restores it; the export is the plain student
    state = task.get_checkpoint_state()
    assert not any(k.startswith(KD_PROJECTION_KEY) for k in state['state_dict'])
    assert set(state['task_state'][KD_PROJECTION_KEY]) == {'weight', 'bias'}
    fresh = _distilled_task(_model(5), argv)
    fresh.load_checkpoint_state(state['state_dict'], state['task_state'])
    assert torch.equal(getattr(fresh.unwrapped_model, KD_PROJECTION_KEY).weight, projection.weight)
    with pytest.raises(ValueError, match='no feature-distillation projection'):
        fresh.load_checkpoint_state(state['state_dict'], None)
    plain = task.export_model()
    assert not hasattr(plain, KD_PROJECTION_KEY) and set(plain.state_dict()) == set(_model(0).state_dict())
    assert hasattr(student, KD_PROJECTION_KEY)  # export copies, training goes on
    assert task.ideal_cost()['teacher_passes'] == 1.0


def _deit(seed):
    torch.manual_seed(seed)
    return timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=24,
                             num_heads=2, num_classes=NUM_CLASSES)


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_token_distillation_loss_on_the_dist_head(teacher_dir, kind):
    argv = ['--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '2', '--no-adv-random-start',
            '--kd-model-name', f'local-dir:{teacher_dir}', '--kd-distill-type', 'token',
            '--kd-token-distill-type', kind, '--task-loss-weight', '0.4']
    student = _deit(0)
    task = _distilled_task(student, argv)
    x, y = _batch()
    seen = []
    student.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    result = task(x, y)
    assert result['output'].shape == (4, NUM_CLASSES)  # the averaged heads, as the attack saw them
    x_adv = _check_attack_on_student(task, student, x, y, seen[-1])

    reference = timm.create_model(f'local-dir:{teacher_dir}', pretrained=True, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        student.set_distilled_training(True)
        cls_logits, dist_logits = student(x_adv)
        student.set_distilled_training(False)
        t_logits = reference(_teacher_input(x, reference))
    task_ce = F.cross_entropy((cls_logits + dist_logits) / 2, y)  # the method's loss: averaged heads
    kd = _kl_by_hand(dist_logits, t_logits, 4.0) if kind == 'soft' else F.cross_entropy(dist_logits,
                                                                                         t_logits.argmax(1))
    assert torch.allclose(result['task_loss'], task_ce, atol=1e-5)
    assert torch.allclose(result['kd_loss'], kd, atol=1e-5)
    assert torch.allclose(result['loss'], 0.4 * task_ce + 0.6 * kd, atol=1e-5)
    result['loss'].backward()
    assert student.head_dist.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('kind, model, message', [
    ('token', lambda: _model(0), 'needs a student with a distillation head'),
    ('feature', lambda: _deit(0), 'no single classifier module'),
    ('feature', lambda: timm.create_model('test_resnet', num_classes=0), 'no single classifier module'),
])
def test_students_that_cannot_distil_are_refused(teacher_dir, kind, model, message):
    from timm_adv.tasks.distill import prepare_kd_model
    args = _parse(['--adv-method', 'pgd', '--kd-model-name', f'local-dir:{teacher_dir}', '--kd-distill-type', kind])
    with pytest.raises(ValueError, match=message):
        prepare_kd_model(model(), args)


def test_feature_distillation_train_resume_and_export(image_folder, wide_teacher_dir, tmp_path):
    from timm_adv.cli import train
    from timm_adv.hub import export_checkpoint
    from timm_adv.tasks.distill import KD_PROJECTION_KEY
    from timm_adv.utils import read_checkpoint
    argv = ['--data-dir', str(image_folder), '--model', 'test_resnet', '--num-classes', str(NUM_CLASSES),
            '--img-size', '32', '-b', '8', '--lr', '0.05', '--warmup-epochs', '0', '--workers', '0', '--no-aug',
            '--adv-val-samples', '0', '--output', str(tmp_path), '--experiment', 'run',
            '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1',
            '--kd-model-name', f'local-dir:{wide_teacher_dir}', '--kd-distill-type', 'feature']
    train.main([*argv, '--epochs', '1'])
    first = read_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))
    plain_keys = set(_model(0).state_dict())
    assert set(first['state_dict']) == plain_keys
    projection = first['task_state'][KD_PROJECTION_KEY]
    assert projection['weight'].shape == (256, 96)

    # the optimiser holds the projection (the student's tensors + its weight and bias), with momentum for it
    opt_params = [i for group in first['optimizer']['param_groups'] for i in group['params']]
    assert len(opt_params) == len(list(_model(0).parameters())) + 2
    assert all('momentum_buffer' in first['optimizer']['state'][i] for i in opt_params)
    # resume restores it and goes on training it
    train.main([*argv, '--epochs', '2', '--resume', str(tmp_path / 'run' / 'last.pth.tar')])
    resumed = read_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))
    assert resumed['epoch'] == 1 and set(resumed['state_dict']) == plain_keys
    assert not torch.equal(resumed['task_state'][KD_PROJECTION_KEY]['weight'], projection['weight'])

    export_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'), str(tmp_path / 'export'))
    assert set(load_file(str(tmp_path / 'export' / 'model.safetensors'))) == plain_keys


def test_advprop_feature_distillation_pulls_both_halves_to_the_clean_teacher(wide_teacher_dir):
    from timm_adv.tasks import get_method
    from timm_adv.tasks.distill import KD_PROJECTION_KEY
    argv = ['--adv-method', 'advprop', '--adv-eps', '0.1', '--adv-steps', '1',
            '--kd-model-name', f'local-dir:{wide_teacher_dir}', '--kd-distill-type', 'feature']
    student = get_method('advprop').prepare_model(_model(0), _parse(argv))
    task = _distilled_task(student, argv)
    features = []
    student.get_classifier().register_forward_pre_hook(lambda m, a: features.append(a[0].detach().clone()))
    x, y = _batch()
    result = task(x, y)
    assert features[-1].shape[0] == 2 * x.shape[0]  # the [clean; adversarial] training forward
    reference = timm.create_model(f'local-dir:{wide_teacher_dir}', pretrained=True, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        t_feat = reference.forward_head(reference.forward_features(_teacher_input(x, reference)), pre_logits=True)
        kd = F.mse_loss(getattr(student, KD_PROJECTION_KEY)(features[-1]), torch.cat([t_feat, t_feat]))
    assert torch.allclose(result['kd_loss'], kd, atol=1e-5)


def test_teacher_built_once_in_the_model_dtype(image_folder, wide_teacher_dir, tmp_path, monkeypatch):
    from timm_adv.cli import train
    from timm_adv.tasks import distill
    built = []

    def counting(*a, **k):
        built.append(DistillationTeacher(*a, **k))
        return built[-1]

    monkeypatch.setattr(distill, 'DistillationTeacher', counting)
    args, _ = train.parse_args([
        '--data-dir', str(image_folder), '--model', 'test_resnet', '--num-classes', str(NUM_CLASSES), '--img-size',
        '32', '-b', '8', '--warmup-epochs', '0', '--workers', '0', '--no-aug', '--epochs', '1', '--adv-val-samples',
        '0', '--model-dtype', 'bfloat16', '--output', str(tmp_path), '--adv-method', 'pgd', '--adv-eps', '0.1',
        '--adv-steps', '1', '--kd-model-name', f'local-dir:{wide_teacher_dir}', '--kd-distill-type', 'feature'])
    state = train.setup(args)
    assert len(built) == 1 and state.task.teacher is built[0]  # feature dims read from the task's teacher
    assert {p.dtype for p in built[0].parameters()} == {torch.bfloat16}
    assert train.train(args, state)['loss'] > 0  # a bf16 student distils from the bf16 teacher

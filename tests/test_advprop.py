"""AdvProp: the task, its attack through the auxiliary BNs, checkpoints and refusals (the dual BN layers
themselves: test_dual_batchnorm.py)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from test_dual_batchnorm import NUM_CLASSES, _batch, _diverge, _model
from timm_adv.attacks import PGDAttack
from timm_adv.layers import aux_bn_state_dict, convert_dual_bn, dual_bn_layers, dual_bn_route, strip_aux_bn
from timm_adv.tasks import AdvPropTask
from timm_adv.tasks.advprop import advprop_steps


def _stats(model, which):
    """Running means of the main or auxiliary BN of every dual layer."""
    pick = (lambda m: m.main_bn) if which == 'main' else (lambda m: m.aux_bn[0])
    return [pick(m).running_mean.clone() for m in dual_bn_layers(model)]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _advprop_task(model, steps=1, bn_mode='eval', targeted='random', **kwargs):
    attack = PGDAttack(eps=2 / 255, steps=steps, step_size=1 / 255, targeted=targeted, bn_mode=bn_mode,
                       mean=(0.5,) * 3, std=(0.5,) * 3)
    return AdvPropTask(model, kwargs.pop('criterion', nn.CrossEntropyLoss()), attack, verbose=False, **kwargs)


@pytest.mark.parametrize('bn_mode', ['eval', 'train_update'])
def test_attack_goes_through_aux_bn(bn_mode):
    model = convert_dual_bn(_model())
    x, y = _batch(8)
    _diverge(model, x)
    task = _advprop_task(model, steps=2, bn_mode=bn_mode)
    real_attack, seen = task.attack, {}

    def spy(m, inp, target):
        seen['state'] = copy.deepcopy(model.state_dict())
        seen['main_before'], seen['aux_before'] = _stats(model, 'main'), _stats(model, 'aux')
        seen['routes'] = {d.route for d in dual_bn_layers(model)}
        seen['x_adv'] = real_attack(m, inp, target)
        seen['main_after'], seen['aux_after'] = _stats(model, 'main'), _stats(model, 'aux')
        return seen['x_adv']

    task.attack = spy
    task.train()
    torch.manual_seed(5)
    task(x, y)
    assert seen['routes'] == {'aux'}
    assert _same(seen['main_before'], seen['main_after'])
    assert _same(seen['aux_before'], seen['aux_after']) == (bn_mode == 'eval')

    if bn_mode == 'eval':
        # the same attack on a plain model holding the auxiliary BNs gives the same adversarial batch
        sd = seen['state']
        aux_as_main = {k.replace('.aux_bn.0.', '.'): v for k, v in aux_bn_state_dict(sd).items()}
        aux_plain, main_plain = _model(seed=3), _model(seed=3)
        aux_plain.load_state_dict({**strip_aux_bn(sd), **aux_as_main})
        main_plain.load_state_dict(strip_aux_bn(sd))
        torch.manual_seed(5)
        assert torch.equal(real_attack(aux_plain, x, y), seen['x_adv'])
        torch.manual_seed(5)
        assert not torch.equal(real_attack(main_plain, x, y), seen['x_adv'])


def test_loss_is_weighted_clean_plus_adversarial():
    model = convert_dual_bn(_model())
    x, y = _batch(8)
    task = _advprop_task(model, clean_weight=0.5, adv_weight=0.5)
    real_attack, seen = task.attack, {}
    task.attack = lambda m, inp, target: seen.setdefault('x_adv', real_attack(m, inp, target))
    before = copy.deepcopy(model)
    task.train()
    out = task(x, y)
    # weights 0.5 / 0.5 equal one CE over the concatenated batch, clean half main BN, adversarial half aux
    ref_clean = before.train()(x)
    with dual_bn_route(before, 'aux'):
        ref_adv = before(seen['x_adv'])
    torch.testing.assert_close(out['loss'], F.cross_entropy(torch.cat([ref_clean, ref_adv]), torch.cat([y, y])))
    torch.testing.assert_close(out['loss_clean'], F.cross_entropy(ref_clean, y))
    out['loss'].backward()
    for route in ('main_bn', 'aux_bn'):  # both sets of BNs learn from this step
        bns = [d.main_bn if route == 'main_bn' else d.aux_bn[0] for d in dual_bn_layers(model)]
        assert sum(float(bn.weight.grad.abs().sum()) for bn in bns) > 0, route


def _reference_losses(model_before, x, x_adv, target, criterion):
    """Clean loss through the main BNs and adversarial loss through the auxiliary BNs, on a copy in train mode."""
    ref = copy.deepcopy(model_before).train()
    loss_clean = criterion(ref(x), target)
    with dual_bn_route(ref, 'aux'):
        loss_adv = criterion(ref(x_adv), target)
    return loss_clean, loss_adv


@pytest.mark.parametrize('targeted', ['random', None])
def test_soft_targets_and_untargeted(targeted):
    model = convert_dual_bn(_model('test_efficientnet'))
    _, y = _batch(8)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # valid images (mean = std = 0.5)
    soft = F.one_hot(y, NUM_CLASSES).float() * 0.7 + F.one_hot(y.roll(1), NUM_CLASSES).float() * 0.3
    criterion = SoftTargetCrossEntropy()
    task = _advprop_task(model, steps=3, targeted=targeted, criterion=criterion)
    real_attack, seen = task.attack, {}
    task.attack = lambda m, inp, target: seen.setdefault('x_adv', real_attack(m, inp, target))
    before = copy.deepcopy(model)
    task.train()
    out = task(x, soft)
    loss_clean, loss_adv = _reference_losses(before, x, seen['x_adv'], soft, criterion)
    torch.testing.assert_close(out['loss'], loss_clean + loss_adv)
    torch.testing.assert_close(out['loss_adv'], loss_adv)
    # the attack (eval-mode auxiliary BNs) moves the soft-target loss the way its targeting asks
    ref = copy.deepcopy(before).eval()
    with torch.no_grad(), dual_bn_route(ref, 'aux'):
        loss_x, loss_x_adv = criterion(ref(x), soft), criterion(ref(seen['x_adv']), soft)
    if targeted is None:
        assert loss_x_adv > loss_x
    pix = lambda t: t * 0.5 + 0.5  # noqa: E731  (mean = std = 0.5)
    assert (pix(seen['x_adv']) - pix(x)).abs().max() <= 2 / 255 + 1e-6


def test_default_loss_weights_are_one_plus_one():
    from timm_adv.cli import train
    args, _ = train.parse_args(['--adv-method', 'advprop'])
    model = AdvPropTask.prepare_model(_model(), args)
    task = AdvPropTask.from_args(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (task.clean_weight, task.adv_weight) == (1.0, 1.0)
    real_attack, seen = task.attack, {}
    task.attack = lambda m, inp, target: seen.setdefault('x_adv', real_attack(m, inp, target))
    x, y = _batch(8)
    before = copy.deepcopy(model)
    task.train()
    out = task(x, y)
    loss_clean, loss_adv = _reference_losses(before, x, seen['x_adv'], y, nn.CrossEntropyLoss())
    torch.testing.assert_close(out['loss'], loss_clean + loss_adv)  # the paper's L_clean + L_adv, not the mean
    assert not torch.allclose(out['loss'], (loss_clean + loss_adv) / 2)


def test_default_attack_follows_the_paper():
    from timm_adv.cli import train
    args, _ = train.parse_args(['--adv-method', 'advprop'])
    attack = AdvPropTask.attack_from_args(args)
    assert (attack.eps, attack.steps, attack.step_size) == (1 / 255, 1, 1 / 255)
    assert (attack.targeted, attack.bn_mode, attack.norm) == ('random', 'eval', 'linf')
    assert [advprop_steps(k / 255) for k in (1, 2, 3, 4)] == [1, 3, 4, 5]
    args, _ = train.parse_args(['--adv-method', 'advprop', '--adv-eps', '4/255', '--adv-targeted', 'none',
                                '--adv-bn-mode', 'train'])
    attack = AdvPropTask.attack_from_args(args)
    assert (attack.steps, attack.targeted, attack.bn_mode) == (5, None, 'train')


def test_refuses_models_without_batchnorm():
    for arch in ('test_vit', 'test_convnext'):
        with pytest.raises(ValueError, match='--adv-method pgd'):
            AdvPropTask.prepare_model(timm.create_model(arch, num_classes=NUM_CLASSES))
    with pytest.raises(ValueError, match='convert'):
        _advprop_task(_model())
    with pytest.raises(ValueError, match='--adv-advprop-clean-weight'):
        _advprop_task(convert_dual_bn(_model()), clean_weight=0.0, adv_weight=0.0)


def _train_argv(data, out, *extra):
    return ['--data-dir', str(data), '--model', 'test_resnet', '--num-classes', str(NUM_CLASSES), '--img-size', '32',
            '--adv-method', 'advprop', '-b', '8', '--lr', '0.05', '--warmup-epochs', '0', '--workers', '0',
            '--no-aug', '--adv-val-samples', '8', '--adv-val-steps', '1', '--output', str(out),
            '--experiment', 'run', *extra]


def test_train_checkpoint_resume_and_export(image_folder, tmp_path):
    from timm_adv.cli import train
    from timm_adv.utils import load_training_checkpoint, read_checkpoint
    train.main(_train_argv(image_folder, tmp_path, '--epochs', '1'))
    run = tmp_path / 'run'
    ckpt = read_checkpoint(str(run / 'last.pth.tar'))
    best = read_checkpoint(str(run / 'model_best.pth.tar'))
    plain = _model()
    plain.load_state_dict(best['state_dict'], strict=True)  # the saved best is the plain timm model
    aux = ckpt['task_state']['aux_bn']
    assert aux and all('.aux_bn.0.' in k for k in aux)

    args, _ = train.parse_args(_train_argv(image_folder, tmp_path, '--epochs', '2', '--resume',
                                           str(run / 'last.pth.tar')))
    state = train.setup(args)
    task = state.task
    assert state.start_epoch == 1
    restored = task.unwrapped_model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in {**ckpt['state_dict'], **aux}.items())
    assert any(not torch.equal(v, restored[k.replace('.aux_bn.0.', '.')]) for k, v in aux.items()
               if k.endswith('running_mean'))  # the auxiliary BNs are not a copy of the main ones

    exported = task.export_model().eval()
    assert not dual_bn_layers(exported) and dual_bn_layers(task.unwrapped_model)
    x, _ = _batch(4)
    loaded = load_training_checkpoint(_model(seed=4), str(run / 'last.pth.tar')).eval()
    assert torch.equal(exported(x), task.unwrapped_model.eval()(x))
    assert torch.equal(loaded(x), exported(x))

    with pytest.raises(ValueError, match='--initial-checkpoint'):
        task.load_checkpoint_state(ckpt['state_dict'], None)

    # the Hub export rebuilds the task from the checkpoint, auxiliary BNs included, and exports the plain model
    from timm_adv.hub import task_from_checkpoint
    rebuilt, _, _ = task_from_checkpoint(str(run / 'last.pth.tar'))
    assert all(torch.equal(rebuilt.unwrapped_model.state_dict()[k], v) for k, v in aux.items())
    assert torch.equal(rebuilt.export_model().eval()(x), exported(x))


def test_train_refuses_bn_free_model(image_folder, tmp_path, capsys):
    from timm_adv.cli import train
    argv = _train_argv(image_folder, tmp_path, '--epochs', '1')
    argv[argv.index('test_resnet')] = 'test_vit'
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert '--adv-method pgd' in capsys.readouterr().err

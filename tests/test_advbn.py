"""AdvBN: the cut layer, the feature-statistics attack, the task, checkpoints, export and refusals."""
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from timm.models.regnet import RegNet, RegNetCfg

from timm_adv.cli import train

from timm_adv.attacks import FeatureStatsAttack, perturb_feature_stats
from timm_adv.layers import (
    AdvBN, advbn_stages, dual_bn_layers, dual_bn_route, get_advbn, insert_advbn, strip_advbn, strip_aux_bn,
)
from timm_adv.tasks import AdvBNTask, create_task

NUM_CLASSES = 10
ARCHS = ['resnet10t', 'test_resnet', 'tiny_regnetx', 'test_efficientnet', 'mobilenetv3_small_050', 'test_convnext']


def _model(arch='test_resnet', seed=0):
    torch.manual_seed(seed)
    if arch == 'tiny_regnetx':  # regnetx blocks (group conv, no SE) at a few thousand parameters
        return RegNet(RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, stem_width=8), num_classes=NUM_CLASSES)
    return timm.create_model(arch, num_classes=NUM_CLASSES)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _insert(model, **kwargs):
    if isinstance(model, timm.models.ConvNeXt):
        with pytest.warns(UserWarning, match='no BatchNorm after'):
            return insert_advbn(model, input_size=(3, 32, 32), **kwargs)
    return insert_advbn(model, input_size=(3, 32, 32), **kwargs)


def _task(model, steps=2, **kwargs):
    attack = FeatureStatsAttack(eps=1.1, steps=steps, step_size=0.2, relu=get_advbn(model).relu)
    return AdvBNTask(model, nn.CrossEntropyLoss(), attack, verbose=False, **kwargs)


def _diverge(model, x):
    """Trains clean and adversarial BNs on different batches so that the two sets differ."""
    model.train()
    with torch.no_grad(), dual_bn_route(model, 'aux'):
        model(3 * x + 1)


@pytest.mark.parametrize('arch', ARCHS)
def test_insert_keeps_outputs_and_back_alone_reproduces_them(arch):
    model = _model(arch).eval()
    x, _ = _batch(4)
    reference = model(x)
    plain_keys = set(model.state_dict())
    _insert(model)
    advbn = get_advbn(model)
    assert advbn.stage == advbn_stages(model)[[f['reduction'] for f in model.feature_info].index(4)]
    model.eval()
    assert torch.equal(model(x), reference)
    feature = advbn.front(model, x)
    assert feature.shape[0] == 4 and feature.ndim == 4
    torch.testing.assert_close(advbn.back(model, feature), reference)
    # front and cut keep single BNs; the back's BNs are dual, except for ConvNeXt which has none
    front_bns = [m for f in advbn.front_modules(model) for m in f.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(any(m is d.main_bn for d in dual_bn_layers(model)) for m in front_bns)
    assert bool(dual_bn_layers(model)) == ('convnext' not in arch)
    # checkpoints keep the plain key names: the AdvBN wrapper adds no level
    assert set(strip_aux_bn(model.state_dict())) == plain_keys


@pytest.mark.parametrize('stage', range(5))
def test_every_resnet_stage(stage):
    model = _model().eval()
    x, y = _batch(4)
    reference = model(x)
    if stage == 4:  # only the pooling and the classifier follow layer4
        with pytest.warns(UserWarning, match="no BatchNorm after 'layer4'"):
            _insert(model, after=stage)
    else:
        _insert(model, after=stage)
    advbn = get_advbn(model)
    assert advbn.stage == ['act1', 'layer1', 'layer2', 'layer3', 'layer4'][stage]
    torch.testing.assert_close(advbn.back(model, advbn.front(model, x)), reference)
    task = _task(model, steps=1)
    task.train()
    task(x, y)['loss'].backward()
    exported = task.export_model().eval()
    assert torch.equal(exported(x), task.unwrapped_model.eval()(x))


def test_perturbation_formula():
    f = torch.randn(6, 4, 5, 5) + 2.0
    a = torch.tensor([0.5, 1.0, 2.0, -0.1]).view(1, 4, 1, 1)
    b = torch.tensor([1.5, 0.0, 1.0, 2.1]).view(1, 4, 1, 1)
    mu = f.mean(dim=(0, 2, 3), keepdim=True)
    out = perturb_feature_stats(f, a, b)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3), keepdim=True), mu * b)  # the mean is scaled by b
    torch.testing.assert_close(out - out.mean(dim=(0, 2, 3), keepdim=True), (f - mu) * a)  # the spread by a
    assert torch.equal(perturb_feature_stats(f, a, b, relu=True), out.clamp_min(0))


def test_attack_moves_only_the_multipliers_within_range_and_raises_the_loss():
    model = _insert(_model())
    _diverge(model, _batch(8, seed=5)[0])
    advbn = get_advbn(model)
    x, y = _batch(8)
    feature = advbn.front(model, x).detach()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = advbn.module.register_forward_hook(lambda *args: calls.append(1))
    attack = FeatureStatsAttack(eps=0.5, steps=4, step_size=0.2, relu=advbn.relu)
    model.train()
    with dual_bn_route(model, 'aux'):
        a, b = attack.perturb(model, lambda f: advbn.back(model, f), feature, y)
    handle.remove()
    assert not calls  # the back-only passes never ran the cut module (nor the front before it)
    assert model.training and all(m.training for m in model.modules())  # restored after the eval-mode attack
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())  # weights and running stats
    assert all(p.grad is None for p in model.parameters())
    assert a.shape == b.shape == (1, feature.shape[1], 1, 1)
    for m in (a, b):
        assert float(m.min()) >= 0.5 - 1e-6 and float(m.max()) <= 1.5 + 1e-6
        assert not torch.equal(m, torch.ones_like(m))
    model.eval()
    with dual_bn_route(model, 'aux'), torch.no_grad():
        clean = F.cross_entropy(advbn.back(model, feature), y)
        adv = F.cross_entropy(advbn.back(model, perturb_feature_stats(feature, a, b, relu=advbn.relu)), y)
    assert adv > clean


def test_training_step_runs_front_once_and_trains_only_the_back():
    model = AdvBNTask.prepare_model(_model(), _args())
    _diverge(model, _batch(8, seed=5)[0])
    task = _task(model, steps=3)
    task.train()
    advbn = task.advbn
    front = advbn.front_modules(model)
    assert all(not m.training for m in front)  # frozen front: BN in eval mode
    calls = {'stem': 0, 'cut': 0}

    def count(name):  # a short-circuited module still fires its hooks, but returns its input unchanged
        return lambda m, args, out: calls.__setitem__(name, calls[name] + (out is not args[0]))

    model.conv1.register_forward_hook(count('stem'))
    advbn.module.register_forward_hook(count('cut'))
    front_state = {k: v.clone() for m in front for k, v in m.state_dict().items()}
    main_before = [m.main_bn.running_mean.clone() for m in dual_bn_layers(model)]
    aux_before = [m.aux_bn[0].running_mean.clone() for m in dual_bn_layers(model)]
    x, y = _batch(8)
    out = task(x, y)
    out['loss'].backward()
    assert calls == {'stem': 1, 'cut': 1}  # 3 attack steps + the training pass never re-ran the front
    assert all(p.grad is None for m in front for p in m.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, front_state[k]) for m in front for k, v in m.state_dict().items())
    # the clean half updated the clean BNs and the adversarial half the adversarial BNs, differently
    main_after = [m.main_bn.running_mean for m in dual_bn_layers(model)]
    aux_after = [m.aux_bn[0].running_mean for m in dual_bn_layers(model)]
    assert not any(torch.equal(a, b) for a, b in zip(main_before, main_after))
    assert not any(torch.equal(a, b) for a, b in zip(aux_before, aux_after))
    assert not torch.equal(main_after[0] - main_before[0], aux_after[0] - aux_before[0])


def _record_routes(model):
    """(route, training, split size) of the first dual BN at each of its calls."""
    seen = []
    dual_bn_layers(model)[0].register_forward_pre_hook(lambda m, args: seen.append((m.route, m.training, m.split_size)))
    return seen


@pytest.mark.parametrize('arch', ['test_resnet', 'tiny_regnetx', 'test_efficientnet', 'mobilenetv3_small_050'])
def test_task_attacks_through_adversarial_bns_and_trains_both_halves(arch):
    # the task itself must route: the attack (eval mode) through the adversarial BNs, the training pass split
    # the hand-built RegNet has no timm name: its family's smallest stands in for the command line
    model = AdvBNTask.prepare_model(_model(arch), _args(model='regnetx_002' if arch == 'tiny_regnetx' else arch))
    task = _task(model, steps=2)
    task.train()
    seen = _record_routes(model)
    x, y = _batch(6)
    out = task(x, y)
    out['loss'].backward()
    assert seen == [('aux', False, None)] * 2 + [('split', True, 6)]
    assert torch.isfinite(out['loss']) and out['loss_adv'] > 0 and out['loss_clean'] > 0
    back = [p for p in model.parameters() if p.requires_grad]
    assert back and all(p.grad is not None for p in back)
    assert all(p.grad is None for m in task.advbn.front_modules(model) for p in m.parameters())


@pytest.mark.parametrize('arch, relu', [('resnet10t', True), ('test_resnet', True), ('tiny_regnetx', True),
                                        ('test_efficientnet', False), ('mobilenetv3_small_050', False),
                                        ('test_convnext', False)])
def test_relu_after_the_perturbation_follows_the_architecture(arch, relu):
    # ResNet / RegNet stages end in a ReLU; EfficientNet / MobileNetV3 blocks end linear, ConvNeXt in a residual add
    assert get_advbn(_insert(_model(arch))).relu is relu


def test_unfrozen_front_is_trained():
    model = AdvBNTask.prepare_model(_model(), _args('--no-adv-advbn-freeze-front'))
    task = _task(model, steps=1, freeze_front=False)
    task.train()
    assert all(m.training for m in task.advbn.front_modules(model))
    x, y = _batch(8)
    task(x, y)['loss'].backward()
    stem_weight = model.conv1[0].weight
    assert stem_weight.grad is not None and stem_weight.grad.abs().sum() > 0


def test_convnext_trains_without_dual_bn():
    model = _insert(_model('test_convnext'))
    task = _task(model, steps=1)
    task.train()
    x, y = _batch(4)
    task(x, y)['loss'].backward()
    assert torch.equal(task.export_model().eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match='--adv-advbn-export-bn clean'):
        _task(model, export_bn='adv')


@pytest.mark.parametrize('export_bn', ['clean', 'adv'])
def test_export_plain_timm(export_bn, tmp_path):
    from timm_adv.hub import export_from_task, write_model_card
    model = _insert(_model())
    _diverge(model, _batch(8, seed=5)[0])
    task = _task(model, export_bn=export_bn)
    x, _ = _batch(4)
    exported = task.export_model().eval()
    assert get_advbn(exported) is None and not dual_bn_layers(exported)
    plain = _model(seed=3)
    plain.load_state_dict(exported.state_dict(), strict=True)
    # the state-dict form of the strip keeps the same BN set as the module form
    stripped = strip_aux_bn(model.state_dict(), keep='main' if export_bn == 'clean' else 'aux')
    assert stripped.keys() == exported.state_dict().keys()
    assert all(torch.equal(v, stripped[k]) for k, v in exported.state_dict().items())
    model.eval()
    with torch.no_grad(), dual_bn_route(model, 'main' if export_bn == 'clean' else 'aux'):
        expected = model(x)
    with torch.no_grad(), dual_bn_route(model, 'aux' if export_bn == 'clean' else 'main'):
        other = model(x)
    assert torch.equal(exported(x), expected) and not torch.allclose(exported(x), other)
    data_config = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation='bilinear')
    export_from_task(task, str(tmp_path / 'hub'), data_config, architecture='test_resnet')
    meta = json.loads((tmp_path / 'hub' / 'config.json').read_text())['timm_adv']
    card = open(write_model_card(str(tmp_path / 'hub'), 'me/test_resnet.advbn')).read()
    word = 'clean BatchNorms are kept' if export_bn == 'clean' else 'adversarial BatchNorms are kept'
    assert word in meta['details']['Exported weights'] and word in card


def test_strip_advbn_restores_the_module():
    model = _insert(_model())
    layer = get_advbn(model)
    assert isinstance(model.layer1, AdvBN)
    strip_advbn(model)
    assert model.layer1 is layer.module and get_advbn(model) is None


def _args(*extra, model='test_resnet'):
    args, _ = train.parse_args(['--model', model, '--num-classes', str(NUM_CLASSES), '--img-size', '32',
                                '--adv-method', 'advbn', '--pretrained', *extra])
    return args


#: The official run (azshue/AdvBN configs/res50_configs.yml, scripts/train.sh, train_imagenet.py), as train.py flags.
OFFICIAL = dict(
    model='resnet50.tv_in1k', pretrained=True, num_classes=1000, adv_method='advbn', adv_advbn_stage='layer1',
    adv_advbn_steps=6, adv_advbn_step_size=0.2, adv_advbn_eps=1.1, adv_advbn_freeze_front=True, epochs=20,
    batch_size=64, sync_bn=True, opt='momentum', momentum=0.9, lr=1e-3, weight_decay=1e-4,
    opt_kwargs={'filter_bias_and_bn': False}, sched='step', decay_epochs=10, decay_rate=0.1, warmup_epochs=0,
    cooldown_epochs=0, smoothing=0.0, mixup=0.0, cutmix=0.0, color_jitter=0.0, aa=None, reprob=0.0, scale=[0.08, 1.0],
    ratio=[0.75, 4 / 3], hflip=0.5, vflip=0.0, train_interpolation='bilinear', interpolation='bilinear',
    crop_pct=0.875, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], amp=False, model_ema=False,
    drop_path=None, drop=0.0, bce_loss=False, jsd_loss=False, clip_grad=None,
)


def test_official_recipe_reproduces_the_official_run(repo_root):
    import os
    args, _ = train.parse_args(['-c', os.path.join(repo_root, 'recipes', 'advbn_resnet50.yaml'), '--data-dir', '/x'])
    assert {k: getattr(args, k) for k in OFFICIAL} == OFFICIAL
    assert args.batch_size * 4 == 256  # 4 processes
    # what the flags build: plain momentum SGD with weight decay on every trained parameter, lr x0.1 at epoch 10
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    model = AdvBNTask.prepare_model(_model('resnet10t'), _args(model='resnet10t'))
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    assert [(g['weight_decay'], g['nesterov'], g['momentum']) for g in optimizer.param_groups] == [(1e-4, False, 0.9)]
    trained = {id(p) for g in optimizer.param_groups for p in g['params'] if p.requires_grad}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}  # BN and biases of the back included
    scheduler, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=10)
    lrs = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert epochs == 20 and lrs == pytest.approx([1e-3] * 10 + [1e-4] * 10)


def test_grad_checkpointing_is_refused_at_start_up(capsys):
    with pytest.raises(SystemExit):
        _args('--grad-checkpointing')
    assert '--grad-checkpointing does not work with --adv-method advbn' in capsys.readouterr().err


def test_bad_input(capsys):
    with pytest.raises(ValueError, match=r"^after 'layer9'.*act1, layer1, layer2, layer3, layer4"):
        insert_advbn(_model(), after='layer9', input_size=(3, 32, 32))
    with pytest.raises(ValueError, match='^after 7'):
        insert_advbn(_model(), after=7, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^--adv-advbn-stage 'layer9'.*act1, layer1"):  # the flag, through train.py
        AdvBNTask.prepare_model(_model(), _args('--adv-advbn-stage', 'layer9'))
    with pytest.raises(ValueError, match='token model'):
        insert_advbn(_model('test_vit'), input_size=(3, 32, 32))
    mixer = MlpMixer(num_classes=NUM_CLASSES, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    with pytest.raises(ValueError, match='token model'):
        insert_advbn(mixer, input_size=(3, 32, 32))
    model = _insert(_model())
    with pytest.raises(ValueError, match='already has an AdvBN'):
        insert_advbn(model)
    for flag, value, fix in (('--adv-eps', '0.1', '--adv-advbn-eps'), ('--adv-steps', '3', '--adv-advbn-steps'),
                             ('--adv-targeted', 'random', '')):
        with pytest.raises(SystemExit):
            train.parse_args(['--adv-method', 'advbn', flag, value])
        err = capsys.readouterr().err
        assert f'{flag} does nothing with --adv-method advbn' in err and fix in err
    with pytest.warns(UserWarning, match='without --pretrained'):
        AdvBNTask.check_args(_without_pretrained())
    for kwargs, dest, flag in ((dict(eps=0), 'adv_advbn_eps', '--adv-advbn-eps'),
                               (dict(steps=0), 'adv_advbn_steps', '--adv-advbn-steps'),
                               (dict(step_size=-1), 'adv_advbn_step_size', '--adv-advbn-step-size')):
        param = next(iter(kwargs))
        with pytest.raises(ValueError, match=f'^{param} must be'):  # the library names its parameter
            FeatureStatsAttack(**kwargs)
        args = _args()
        setattr(args, dest, kwargs[param])  # as a -c config sets it, past the flag's argparse type
        with pytest.raises(ValueError, match=f'^{flag} must be'):  # train.py names the flag
            create_task(AdvBNTask.prepare_model(_model(), args), nn.CrossEntropyLoss(), args)


def _without_pretrained():
    args = _args()
    args.pretrained = False
    return args


@pytest.mark.parametrize('flag, value', [('--adv-advbn-eps', '0'), ('--adv-advbn-steps', '0'),
                                         ('--adv-advbn-step-size', '-0.2')])
def test_bad_flags_fail_in_argparse(flag, value, capsys):
    with pytest.raises(SystemExit):
        _args(flag, value)
    assert flag in capsys.readouterr().err


def _train_argv(data, out, *extra):
    return ['--data-dir', str(data), '--model', 'test_resnet', '--num-classes', str(NUM_CLASSES), '--img-size', '32',
            '--adv-method', 'advbn', '--adv-advbn-steps', '2', '-b', '8', '--lr', '0.05', '--warmup-epochs', '0',
            '--workers', '0', '--no-aug', '--adv-val-samples', '8', '--adv-val-steps', '1', '--output', str(out),
            *extra]


def test_train_fine_tunes_resumes_and_exports(image_folder, tmp_path):
    from timm_adv.cli import train
    from timm_adv.hub import export_checkpoint
    from timm_adv.utils import read_checkpoint
    base = _model()
    torch.save(base.state_dict(), tmp_path / 'plain.pth')
    train.main(_train_argv(image_folder, tmp_path, '--epochs', '1', '--experiment', 'run',
                           '--initial-checkpoint', str(tmp_path / 'plain.pth')))
    run = tmp_path / 'run'
    ckpt = read_checkpoint(str(run / 'last.pth.tar'))
    plain = _model(seed=2)
    plain.load_state_dict(ckpt['state_dict'], strict=True)  # the saved model is plain timm (clean BNs)
    aux = ckpt['task_state']['aux_bn']
    assert aux and all('.aux_bn.0.' in k and not k.startswith(('conv1', 'bn1', 'layer1')) for k in aux)
    # the frozen front is the initial checkpoint's, bit for bit
    assert all(torch.equal(ckpt['state_dict'][k], v) for k, v in base.state_dict().items()
               if k.startswith(('conv1', 'bn1', 'layer1.')))
    assert not torch.equal(ckpt['state_dict']['fc.weight'], base.state_dict()['fc.weight'])

    args, _ = train.parse_args(_train_argv(image_folder, tmp_path, '--epochs', '2', '--experiment', 'run',
                                           '--resume', str(run / 'last.pth.tar')))
    state = train.setup(args)
    restored = state.task.unwrapped_model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in {**ckpt['state_dict'], **aux}.items())

    exported, _ = export_checkpoint(str(run / 'last.pth.tar'), str(tmp_path / 'hub'))
    x, _ = _batch(4)
    model = state.task.unwrapped_model.eval()
    assert torch.equal(exported.model.eval()(x), model(x))
    assert exported.max_abs_diff == 0.0

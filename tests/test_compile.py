"""``--torchcompile``: attacks run through the compiled model, compile once per BN mode / route, match eager.

Backends ``eager`` / ``aot_eager`` make dynamo trace (and AOTAutograd build the compiled backward) without
inductor's C++ build, so recompiles are countable in seconds.
"""
import argparse
import copy

import pytest
import timm
import torch
import torch._dynamo
import torch.nn as nn

from timm_adv.cli import train
from timm_adv.attacks import create_attack
from timm_adv.evaluation import evaluate_accuracy
from timm_adv.tasks import add_adv_args, create_task, get_method
from timm_adv.utils import check_compile_args, compiled_graphs

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # each test counts its own graphs; a recompile-limit hit must fail instead of silently running eager
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _task(method, *argv, seed=0):
    parser = argparse.ArgumentParser()
    add_adv_args(parser)
    args = parser.parse_args(['--adv-method', method, *argv])
    args.num_classes, args.model, args.input_size, args.img_size = 10, 'test_resnet', (3, 32, 32), None
    torch.manual_seed(seed)
    model = get_method(method).prepare_model(timm.create_model('test_resnet', num_classes=10), args)
    return create_task(model, nn.CrossEntropyLoss(), args, mean=MEAN, std=STD)


def _step(task, optimizer, x, y, seed):
    torch.manual_seed(seed)  # same random start / targets on both sides
    result = task(x, y)
    result['loss'].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result['loss'].item()


def _batches(n, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


# (method, flags, graphs: one per BN mode / route x grad mode the method meets, backend): aot_eager builds the
# compiled backward as inductor does; eager only traces (graphs and guards, so the same compile count), cheaper
METHODS = [
    ('pgd', ('--adv-steps', '3', '--adv-eps', '0.1'), 2, 'aot_eager'),  # attack (frozen weights), training pass
    ('advprop', (), 2, 'aot_eager'),             # attack via the auxiliary BNs, training via the split route
    ('fgsm-sdi', ('--adv-sdi-every', '2'), 2, 'eager'),  # generator step on every other batch: no graph of its own
    ('advbn', ('--adv-advbn-steps', '2'), 2, 'eager'),   # attack and training on the back only
    ('dat', ('--adv-dat-aux-bn',), 3, 'eager'),  # attack and DAT pass via the auxiliary BNs, clean pass
]


@pytest.mark.parametrize('method,argv,graphs,backend', METHODS, ids=[m[0] for m in METHODS])
def test_compiled_training_matches_eager_and_stops_compiling_after_warm_up(method, argv, graphs, backend, request):
    if method == 'dat':
        argv = (*argv, '--adv-dat-vqgan', request.getfixturevalue('vqgan_dir'))
    eager, compiled = _task(method, *argv), _task(method, *argv)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend=backend)
    opt_e = torch.optim.SGD(eager.unwrapped_model.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled.unwrapped_model.parameters(), lr=0.05)
    eager.train()
    compiled.train()
    counts, base = [], compiled_graphs()
    for i, (x, y) in enumerate(_batches(3)):
        loss_e = _step(eager, opt_e, x, y, seed=i)
        loss_c = _step(compiled, opt_c, x, y, seed=i)
        assert loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-5), f'step {i}'
        counts.append(compiled_graphs() - base)
    # every graph compiles in the first steps; none after
    assert counts[1] == counts[-1] == graphs, counts
    state_e, state_c = eager.unwrapped_model.state_dict(), compiled.unwrapped_model.state_dict()
    assert state_c.keys() == state_e.keys()  # no '_orig_mod.' prefix: checkpoints stay plain timm
    for k, v in state_e.items():  # weights and BN running statistics (the attack leaves them alone)
        assert torch.allclose(state_c[k].float(), v.float(), atol=1e-4), k


def test_pgd_attack_skips_parameter_gradients_and_restores_requires_grad():
    task = _task('pgd', '--adv-steps', '2', '--adv-eps', '0.1')
    task.compile(backend='eager')
    model = task.unwrapped_model
    frozen = model.fc.weight
    frozen.requires_grad_(False)
    seen = []
    handle = model.conv1[0].register_forward_hook(lambda m, i, o: seen.append(m.weight.requires_grad))
    x, y = _batches(1)[0]
    task.train()
    task(x, y)['loss'].backward()
    handle.remove()
    assert seen == [False, False, True]  # two attack passes with frozen weights, then the trained pass
    assert not frozen.requires_grad and frozen.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if n != 'fc.weight')


def test_robust_validation_through_the_compiled_eval_model_matches_eager():
    task = _task('pgd', '--adv-steps', '1', '--adv-eps', '0.1')
    plain = copy.deepcopy(task.unwrapped_model).eval()
    task.compile(backend='aot_eager')
    assert task.get_eval_model() is task.attack_model is not task.unwrapped_model
    data = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*_batches(3, size=7))])
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # 21 images: a last batch of 5
    attack = create_attack(eps=0.1, steps=3, bn_mode='eval', mean=MEAN, std=STD)
    results = []
    for model in (plain, task.get_eval_model(), task.get_eval_model()):
        torch.manual_seed(0)
        results.append(evaluate_accuracy(model, loader, attack=attack, device=torch.device('cpu')))
        if len(results) == 2:
            after_first = compiled_graphs()
    assert results[1] == pytest.approx(results[0], abs=1e-3)
    assert compiled_graphs() == after_first  # the second evaluation reuses every graph


def test_train_py_torchcompile_end_to_end(tmp_path, image_folder, monkeypatch):
    graphs_at_epoch = []
    real = train.train_one_epoch

    def counting(epoch, *a, **k):
        graphs_at_epoch.append(compiled_graphs())
        return real(epoch, *a, **k)

    monkeypatch.setattr(train, 'train_one_epoch', counting)
    metrics = train.main([
        '--data-dir', str(image_folder), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '32', '--no-aug', '-b', '8', '--lr', '0.05',
        '--warmup-epochs', '0', '--workers', '0', '--epochs', '2', '--adv-method', 'pgd', '--adv-steps', '1',
        '--adv-eps', '0.1', '--adv-val-samples', '12', '--model-ema', '--torchcompile', 'eager',
        '--output', str(tmp_path), '--experiment', 'compiled'])
    assert {'top1', 'pgd_top1'} <= set(metrics)  # the EMA's (timm: EMA metrics replace the model's)
    assert compiled_graphs() == graphs_at_epoch[1] > 0  # epoch 2 (train + clean / PGD / EMA validation) compiled nothing
    ckpt = torch.load(tmp_path / 'compiled' / 'last.pth.tar', map_location='cpu', weights_only=False)
    timm.create_model('test_resnet', num_classes=10).load_state_dict(ckpt['state_dict'])  # strict: plain keys
    timm.create_model('test_resnet', num_classes=10).load_state_dict(ckpt['state_dict_ema'])


@pytest.mark.parametrize('backend,mode,message', [
    (None, 'max-autotune', '--torchcompile-mode max-autotune does nothing without --torchcompile'),
    ('no_such_backend', None, '--torchcompile no_such_backend: unknown torch.compile backend'),
])
def test_bad_compile_flags_fail_naming_the_flag(backend, mode, message, capsys):
    with pytest.raises(ValueError, match=message):
        check_compile_args(backend, mode)
    argv = (['--torchcompile', backend] if backend else []) + (['--torchcompile-mode', mode] if mode else [])
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err

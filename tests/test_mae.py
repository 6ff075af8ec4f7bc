"""MAE fine-tuning: original-format checkpoints, layer decay, gradient accumulation, ViT robustness."""
import argparse
import contextlib
import glob
import logging
import math
import os

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer_v2

from timm_adv.cli import train
from conftest import mae_checkpoint, run_killed_and_resumed
from timm_adv.attacks import create_attack
from timm_adv.models import MAEWeights, is_mae_checkpoint, load_mae_weights, resolve_mae_weights
from timm_adv.hub.pipeline import load_hub_config, train_command
from timm_adv.tasks import create_task, get_method
from timm_adv.utils import CheckpointError, check_layer_decay

# test_vit (width 64, depth 6) with 4 px patches: an 8x8 grid at 32 px
VIT = ['--model', 'test_vit', '--model-kwargs', 'patch_size=4', 'img_size=32', '--gp', 'avg']
DEPTH = 6


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """160 / 40 real digits as an ImageFolder: train.py runs that take seconds."""
    from timm_adv.data import create_dataset
    root = tmp_path_factory.mktemp('digits')
    digits = create_dataset('bundled/mnist', split='train', is_training=True)
    counts = {}
    for image, label in (digits[i] for i in range(len(digits))):
        n = counts.get(label, 0)
        if n >= 20:
            continue
        counts[label] = n + 1
        folder = root / ('train' if n < 16 else 'validation') / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f'{n}.png')
        if len(counts) == 10 and all(c >= 20 for c in counts.values()):
            break
    return root


def _fast(image_folder, tmp_path, name, *extra):
    return ['--data-dir', str(image_folder), *VIT, '--input-size', '3', '32', '32', '--crop-pct', '1', '--no-aug', '--num-classes', '10',
            '--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '-b', '16', '--workers', '0',
            '--smoothing', '0', '--warmup-epochs', '0', '--adv-val-samples', '0', '--log-interval', '1000',
            '--output', str(tmp_path), '--experiment', name, *extra]


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


# ---------------------------------------------------------------- loading

def test_original_mae_checkpoint_loads_encoder_drops_decoder_new_head(mae_file, image_folder, tmp_path, caplog):
    path, saved = mae_file
    assert is_mae_checkpoint(_load(path))
    caplog.set_level(logging.INFO)
    args, _ = train.parse_args(_fast(image_folder, tmp_path, 'x', '--pretrained', '--pretrained-path', str(path)))
    model = train.setup(args).task.unwrapped_model
    loaded = model.state_dict()

    encoder = [k for k in saved if k.startswith(('blocks.', 'patch_embed.', 'cls_token'))]
    assert len(encoder) == 3 + DEPTH * 12
    for k in encoder:
        assert torch.equal(loaded[k], saved[k]), k
    assert not any(k.startswith(('decoder', 'mask_token')) for k in loaded)
    # --gp avg: MAE's pooled fc_norm is new, the pre-training norm is unused and dropped
    assert isinstance(model.norm, nn.Identity)
    assert torch.equal(loaded['fc_norm.weight'], torch.ones(64)) and torch.equal(loaded['fc_norm.bias'], torch.zeros(64))
    assert 0 < loaded['head.weight'].std() < 5e-5 and torch.equal(loaded['head.bias'], torch.zeros(10))
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith('MAE weights')]
    assert len(line) == 1
    assert ('loaded 76 encoder tensors (pos_embed resampled from 49 to 64 patches); dropped 18 decoder tensors, '
            'norm.weight, norm.bias, mask_token; new: fc_norm, head' in line[0])
    # this run normalises with 0.5, not the ImageNet mean/std MAE's releases were pre-trained with
    assert 'pre-trained on inputs normalised with ImageNet mean/std, but this run normalises with mean' in caplog.text


def test_initial_checkpoint_wins_over_mae_weights(mae_file, image_folder, tmp_path):
    path, _ = mae_file
    torch.manual_seed(5)
    initial = timm.create_model('test_vit', patch_size=4, img_size=32, global_pool='avg', num_classes=10).state_dict()
    torch.save({'state_dict': initial}, tmp_path / 'initial.pth')
    args, _ = train.parse_args(_fast(image_folder, tmp_path, 'x', '--pretrained', '--pretrained-path', str(path),
                                     '--initial-checkpoint', str(tmp_path / 'initial.pth')))
    loaded = train.setup(args).task.unwrapped_model.state_dict()
    assert set(loaded) == set(initial)
    mixed = [k for k in initial if not torch.equal(loaded[k], initial[k])]
    assert not mixed, f'tensors not from --initial-checkpoint: {mixed[:3]}'


def test_headless_mae_tag_without_num_classes_is_refused(image_folder, tmp_path):
    argv = [a for a in _fast(image_folder, tmp_path, 'x') if a not in ('--num-classes', '10')]
    args, _ = train.parse_args([*argv, '--model', 'vit_base_patch16_224.mae', '--model-kwargs', 'depth=1'])
    with pytest.raises(ValueError, match='num_classes 0 in its pretrained config.*--num-classes N'):
        train.setup(args)  # timm's .mae tags carry num_classes=0: CE would run on the pooled features


def test_hub_copies_of_mae_tags_take_the_mae_path():
    name = 'hf-hub:timm/vit_base_patch16_224.mae'
    assert resolve_mae_weights(name, pretrained=True) == MAEWeights('--pretrained', name)
    assert resolve_mae_weights('hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', pretrained=True) is None


def test_pos_embed_resampled_to_the_fine_tuning_grid(mae_file):
    path, saved = mae_file
    model = timm.create_model('test_vit', patch_size=4, img_size=32, num_classes=10, global_pool='avg')
    report = load_mae_weights(model, MAEWeights('--initial-checkpoint', str(path), saved))
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 8 * 8, 64) and saved['pos_embed'].shape == (1, 1 + 7 * 7, 64)
    assert torch.equal(pos[:, 0], saved['pos_embed'][:, 0])  # the class token's position is kept
    expected = resample_abs_pos_embed(saved['pos_embed'], new_size=(8, 8), old_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(pos, expected)
    # a 7x7 grid resampled to 8x8 keeps the coarse layout: corners stay closest to their own corners
    grid_old, grid_new = saved['pos_embed'][0, 1:].view(7, 7, 64), pos[0, 1:].view(8, 8, 64)
    for (i, j), (k, l) in (((0, 0), (0, 0)), ((0, 6), (0, 7)), ((6, 0), (7, 0)), ((6, 6), (7, 7))):
        dists = (grid_old.view(49, 64) - grid_new[k, l]).norm(dim=1)
        assert dists.argmin().item() == i * 7 + j
    assert 'pos_embed resampled from 49 to 64 patches' in report.summary(MAEWeights('f', 'x'), 'test_vit')


def test_timm_layout_mae_encoder_through_the_pretrained_tag_path(mae_file, tmp_path):
    # what timm's `.mae` Hub tags hold: the encoder only, timm key names (norm included)
    path, saved = mae_file
    encoder_file = tmp_path / 'encoder.pth'
    torch.save({k: v for k, v in saved.items() if not k.startswith(('decoder', 'mask_token'))}, encoder_file)
    assert resolve_mae_weights('vit_base_patch16_224.mae', pretrained=True) == \
        MAEWeights('--pretrained', 'vit_base_patch16_224.mae')
    assert resolve_mae_weights('vit_base_patch16_224.augreg2_in21k_ft_in1k', pretrained=True) is None
    model = timm.create_model('test_vit', patch_size=4, img_size=28, num_classes=5, global_pool='token',
                              pretrained_cfg_overlay=dict(file=str(encoder_file), num_classes=0))
    report = load_mae_weights(model, MAEWeights('--pretrained', 'test_vit'))
    assert torch.equal(model.norm.weight, saved['norm.weight'])  # class-token pooling keeps the encoder norm
    assert report.new == ['head.weight', 'head.bias'] and not report.dropped and not report.pos_embed


def test_checkpoint_of_another_vit_size_names_both_shapes(tmp_path, capsys):
    wide = tmp_path / 'mae_wide.pth'
    mae_checkpoint(wide, embed_dim=96)
    with pytest.raises(SystemExit) as e:
        train.main([*VIT, '--initial-checkpoint', str(wide), '--output', str(tmp_path), '--experiment', 'x'])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"--initial-checkpoint '{wide}': MAE checkpoint does not fit" in err
    assert 'is 1x1x96 in the checkpoint but 1x1x64 in the model' in err
    assert not (tmp_path / 'x').exists()


def test_mae_weights_refuse_a_non_vit_model(mae_file):
    path, saved = mae_file
    with pytest.raises(CheckpointError, match="MAE weights are ViT encoders, but --model 'test_resnet'"):
        load_mae_weights(timm.create_model('test_resnet'), MAEWeights('--pretrained-path', str(path), saved),
                         'test_resnet')


# ---------------------------------------------------------------- layer decay

def test_layer_decay_scales_in_the_optimizer_param_groups(image_folder, tmp_path):
    args, _ = train.parse_args(_fast(image_folder, tmp_path, 'x', '--opt', 'adamw', '--lr-base', '4e-3', '--lr-base-scale',
                                     'linear', '--layer-decay', '0.65', '--weight-decay', '0.05', '--grad-accum-steps', '4',
                                     '--head-init-bias', '-2.5'))
    state = train.setup(args)
    assert torch.equal(state.task.unwrapped_model.head.bias, torch.full((10,), -2.5))  # timm's --head-init-bias
    assert args.lr == pytest.approx(4e-3 * 16 * 4 / 256)  # linear scaling counts the accumulated batch (timm)
    model, optimizer = state.task.unwrapped_model, state.optimizer
    names = {id(p): n for n, p in model.named_parameters()}

    def mae_layer_id(name):  # MAE's util/lr_decay.py: embeddings 0, block i -> i + 1, the rest num_layers + 1
        if name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        return DEPTH + 1

    seen = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            expected = 0.65 ** (DEPTH + 1 - mae_layer_id(name))
            assert group['lr_scale'] == pytest.approx(expected), name
            assert group['lr'] == pytest.approx(1e-3 * expected), name
            assert group['weight_decay'] == (0.0 if p.ndim <= 1 or name in ('pos_embed', 'cls_token') else 0.05)
            seen.add(name)
    assert seen == set(names.values()) and len({g['lr_scale'] for g in optimizer.param_groups}) == DEPTH + 2


def test_layer_decay_needs_layer_grouping_and_a_sane_value():
    flat = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="--layer-decay 0.65: model 'flat' has no layer grouping"):
        check_layer_decay(create_optimizer_v2(flat, 'sgd', lr=0.1, layer_decay=0.65), 0.65, 'flat')
    vit = timm.create_model('test_vit')
    check_layer_decay(create_optimizer_v2(vit, 'adamw', lr=0.1, layer_decay=0.65), 0.65, 'test_vit')
    with pytest.raises(ValueError, match=r'--layer-decay must be in \(0, 1\)'):
        check_layer_decay(create_optimizer_v2(vit, 'adamw', lr=0.1, layer_decay=1.5), 1.5, 'test_vit')


# ---------------------------------------------------------------- gradient accumulation

class _Recorder:
    """Stands in for the scheduler and DDP's no_sync: records what the loop asks of them."""

    def __init__(self):
        self.updates, self.no_sync_entered = [], 0

    def step_update(self, num_updates, metric=None):
        self.updates.append(num_updates)

    def no_sync(self):
        self.no_sync_entered += 1
        return contextlib.nullcontext()


def _accum_run(batches, accum_steps, distributed=False):
    torch.manual_seed(0)
    model = timm.create_model('test_vit', patch_size=8, img_size=32, num_classes=10)
    args, _ = train.parse_args(['--adv-method', 'pgd', '--adv-eps', '0.05', '--adv-steps', '2', '--no-adv-random-start',
                                '--grad-accum-steps', str(accum_steps), '--no-prefetcher', '--log-interval', '1000'])
    args.distributed, args.world_size, args.rank, args.num_classes = distributed, 1, 0, 10
    task = create_task(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    recorder = _Recorder()
    if distributed:
        task.no_sync = recorder.no_sync
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train.train_one_epoch(0, task, batches, optimizer, args, torch.device('cpu'), lr_scheduler=recorder)
    return model, recorder


def test_grad_accumulation_equals_one_large_batch():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(56, 3, 32, 32, generator=g), torch.randint(0, 10, (56,), generator=g)
    micro = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 56, 8)]           # 7 batches of 8, groups of 3, 3, 1
    large = [(x[:24], y[:24]), (x[24:48], y[24:48]), (x[48:], y[48:])]   # the same updates as batches of 24, 24, 8
    accumulated, rec = _accum_run(micro, accum_steps=3, distributed=True)
    reference, rec_ref = _accum_run(large, accum_steps=1)
    assert rec.updates == rec_ref.updates == [1, 2, 3]  # the scheduler counts optimizer updates
    assert rec.no_sync_entered == 4  # batches 0, 1, 3, 4: all but the last of each group skip the all-reduce
    start = timm.create_model('test_vit', patch_size=8, img_size=32, num_classes=10)
    moved = 0.0
    for (k, a), b in zip(accumulated.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=k)
        moved = max(moved, (a - start.state_dict()[k]).abs().max().item())
    assert moved > 1e-2  # the three updates did change the model


@pytest.mark.parametrize('argv,message', [
    (['--grad-accum-steps', '0'], '--grad-accum-steps must be >= 1, got 0'),
    (['--pretrained-path', __file__], '--pretrained-path replaces the pretrained weights, as in timm, and needs --pretrained'),
    (['--layer-decay', '1.5'], '--layer-decay must be in (0, 1)'),
    (['--num-classes', '0', '--head-init-scale', '0.001'], "--head-init-scale/--head-init-bias: 'test_vit' has no classifier"),
])
def test_bad_input_fails_early_naming_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main([*VIT, '--output', str(tmp_path), '--experiment', 'bad', *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'bad').exists()


def test_exact_resume_with_accumulation_and_layer_decay(image_folder, tmp_path, monkeypatch, mae_file):
    path, _ = mae_file
    extra = ['--epochs', '2', '--opt', 'adamw', '--lr', '1e-3', '--layer-decay', '0.65', '--sched-on-updates',
             '--grad-accum-steps', '4', '--adv-method', 'pgd', '--adv-eps', '0.05', '--adv-steps', '1',
             '--pretrained', '--pretrained-path', str(path)]
    run_killed_and_resumed(lambda name, *argv: train.main(_fast(image_folder, tmp_path, name, *argv)),
                           tmp_path, monkeypatch, extra)

    full, resumed = _load(tmp_path / 'full' / 'last.pth.tar'), _load(tmp_path / 'killed' / 'last.pth.tar')
    for k, v in full['state_dict'].items():
        assert torch.equal(v, resumed['state_dict'][k]), k
    updates = 2 * math.ceil(160 // 16 / 4)  # 10 batches an epoch in groups of 4, 4, 2
    for s_full, s_res in zip(full['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert int(s_full['step']) == int(s_res['step']) == updates
        assert torch.equal(s_full['exp_avg'], s_res['exp_avg']) and torch.equal(s_full['exp_avg_sq'], s_res['exp_avg_sq'])
    scales = [g['lr_scale'] for g in resumed['optimizer']['param_groups']]
    assert scales == [g['lr_scale'] for g in full['optimizer']['param_groups']] and len(set(scales)) == DEPTH + 2


# ---------------------------------------------------------------- robustness methods on ViTs

@pytest.mark.parametrize('method', ['pgd', 'fgsm-rs', 'fgsm-sdi'])
def test_methods_train_a_vit(method):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=10)
    args, _ = train.parse_args(['--adv-method', method, '--adv-eps', '8/255', '--adv-steps', '2'] if method == 'pgd'
                               else ['--adv-method', method])
    args.num_classes = 10
    model = get_method(method).prepare_model(model, args)
    task = create_task(model, nn.CrossEntropyLoss(), args, mean=(0.5,) * 3, std=(0.5,) * 3)
    task.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    result = task(x, y)
    result['loss'].backward()
    assert torch.isfinite(result['loss'])
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_advprop_refuses_a_vit(capsys, tmp_path):
    with pytest.raises(SystemExit):
        train.main([*VIT, '--adv-method', 'advprop', '--output', str(tmp_path), '--experiment', 'x', '--workers', '0'])
    err = capsys.readouterr().err
    assert "--adv-method advprop needs BatchNorm layers" in err and "'test_vit' has none" in err


@pytest.mark.parametrize('amp', [False, True])
def test_vit_attack_with_amp_and_grad_checkpointing(amp):
    torch.manual_seed(0)
    model = timm.create_model('test_vit', patch_size=8, img_size=32, num_classes=10)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (4,))
    attack = create_attack(eps=8 / 255, steps=3, bn_mode='train', mean=(0.5,) * 3, std=(0.5,) * 3)
    context = torch.autocast('cpu', dtype=torch.bfloat16) if amp else torch.autocast('cpu', enabled=False)
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(1)
        with context:
            x_adv = attack(model, x, y)
        results.append(x_adv)
        with torch.no_grad():
            clean, adv = (nn.functional.cross_entropy(model(t).float(), y) for t in (x, x_adv))
        assert adv > clean
        assert ((x_adv - x) * 0.5).abs().max() <= 8 / 255 + 1e-6
    # checkpointing recomputes the same forward: the same adversarial examples
    torch.testing.assert_close(results[0], results[1], atol=1e-2 if amp else 1e-5, rtol=0)


def test_vit_amp_grad_checkpointing_train_run(image_folder, tmp_path):
    metrics = train.main(_fast(image_folder, tmp_path, 'amp', '--epochs', '1', '--amp', '--grad-checkpointing',
                               '--adv-method', 'pgd', '--adv-eps', '0.05', '--adv-steps', '2', '--opt', 'adamw',
                               '--lr', '1e-3', '--adv-val-samples', '8', '--adv-val-steps', '2',
                               '--model-kwargs', 'patch_size=8', 'img_size=32', '-b', '32'))
    assert math.isfinite(metrics['loss']) and 'pgd_top1' in metrics
    args = yaml.safe_load((tmp_path / 'amp' / 'args.yaml').read_text())
    assert args['amp'] and args['grad_checkpointing']


# ---------------------------------------------------------------- recipes and hub configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'recipes', 'mae_*.yaml')))


@pytest.mark.parametrize('name', RECIPES)
def test_mae_recipes_are_train_configs(name, caplog):
    path = os.path.join(REPO, 'recipes', name)
    cfg = yaml.safe_load(open(path))
    args, _ = train.parse_args(['-c', path])
    assert 'were ignored' not in caplog.text
    assert args.model == cfg['model'] and args.model.endswith('.mae') and args.pretrained and args.gp == 'avg'
    assert args.batch_size * 8 * args.grad_accum_steps == 1024  # MAE's effective batch on 8 GPUs
    base = 'vit_base' in name
    assert args.epochs + args.warmup_epochs == (100 if base else 50) and args.warmup_prefix
    assert (args.lr_base, args.layer_decay) == ((5e-4, 0.65) if base else (1e-3, 0.75))
    assert args.drop_path == {'base': 0.1, 'large': 0.2, 'huge': 0.3}[name.split('_')[2]]
    assert (args.opt, args.weight_decay, args.mixup, args.cutmix, args.reprob) == ('adamw', 0.05, 0.8, 1.0, 0.25)
    # no robust selection on the split the figures are reported on (a test-set leak)
    assert 'pgd_top1' not in args.eval_metric or args.val_split != 'validation'
    if args.adv_method == 'pgd':
        assert args.adv_eps == pytest.approx(4 / 255) and args.adv_steps == 3
        assert args.smoothing == 0  # label smoothing masks PGD's gradients (see the bundled recipe)
    else:
        assert args.smoothing == 0.1


def test_mae_hub_configs_train_from_the_recipe_and_tag(tmp_path):
    config = load_hub_config(os.path.join(REPO, 'hub_configs', 'vit_base_patch16_224_mae_pgd_at_in1k.yaml'))
    argv = train_command(config, '/tmp/out', 'exp')
    assert argv[1:3] == ['-c', os.path.join(REPO, 'recipes', 'mae_vit_base_patch16_224_pgd.yaml')]
    args, _ = train.parse_args(argv[1:])
    assert (args.model, args.pretrained, args.pretrained_path) == ('vit_base_patch16_224.mae', True, None)
    assert args.adv_method == 'pgd' and args.layer_decay == 0.65 and args.grad_accum_steps == 4

    original = dict(config, base_weights='/weights/mae_pretrain_vit_base.pth')
    args, _ = train.parse_args(train_command(original, '/tmp/out', 'exp')[1:])
    assert (args.model, args.pretrained_path) == ('vit_base_patch16_224.mae', '/weights/mae_pretrain_vit_base.pth')

    wrong = tmp_path / 'wrong.yaml'
    wrong.write_text(yaml.safe_dump(dict(config, base_weights='vit_large_patch16_224.mae')))
    with pytest.raises(ValueError, match="base_weights 'vit_large_patch16_224.mae' are not weights of architecture"):
        load_hub_config(str(wrong))

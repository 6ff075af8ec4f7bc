import copy
import functools
import os
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm_adv.attacks import (KNNGuidedAttack, PGDAttack, PixelNormalizer, attack_bn_mode, create_attack,
                              guided_similarity_loss, parse_eps, random_init)
from timm_adv.data import BundledMnist
from timm_adv.evaluation import PixelSpaceModel

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _model(name='resnet10t', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs)


def _batch(n=8, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _digits(split, n):
    ds = BundledMnist(split)
    x = torch.from_numpy(ds.images[:n]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return F.interpolate(x, size=32, mode='bilinear'), torch.from_numpy(ds.targets[:n])


@functools.lru_cache(maxsize=1)
def _fitted():
    """A softmax-regression digit classifier: accurate, confident and cheap to attack."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = _digits('train', 2000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _trained_model():
    """The fitted model (taking pixels) and 16 validation digits."""
    x, y = _digits('validation', 16)
    return copy.deepcopy(_fitted()), x, y


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_eps_ball_and_pixel_range(norm):
    model = _model().eval()
    x, y = _batch()
    eps = 8 / 255 if norm == 'linf' else 0.5
    attack = PGDAttack(eps, steps=3, norm=norm, mean=MEAN, std=STD)
    norm_ = PixelNormalizer(MEAN, STD)
    x_adv = norm_.to_pixel(attack(model, norm_.from_pixel(x), y))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == 'linf' else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert size.min() > eps / 4  # every sample actually moved
    assert x_adv.min() >= -1e-6 and x_adv.max() <= 1 + 1e-6


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_attack_increases_loss(norm):
    model, x, y = _trained_model()
    eps = 0.1 if norm == 'linf' else 1.5
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
    for steps in (1, 5):
        x_adv = PGDAttack(eps, steps=steps, norm=norm)(model, x, y)
        with torch.no_grad():
            assert F.cross_entropy(model(x_adv), y) > clean_loss + 0.05


def test_no_parameter_gradients():
    model, x, y = _trained_model()
    model.train()
    PGDAttack(8 / 255, steps=2, bn_mode='train')(model, x, y)
    assert all(p.grad is None for p in model.parameters())


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_bn_running_stats_untouched(mode):
    model = _model()
    model.train()
    x, y = _batch()
    before = _bn_buffers(model)
    PGDAttack(8 / 255, steps=2, bn_mode=mode)(model, x, y)
    after = _bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_train_update_mode_updates_stats_only_when_asked():
    model = _model()
    x, y = _batch()
    before = _bn_buffers(model)
    PGDAttack(8 / 255, steps=1, bn_mode='train_update')(model, x, y)
    assert not torch.equal(before['bn1.running_mean'], model.state_dict()['bn1.running_mean'])


def test_bn_modes_differ_in_statistics():
    """eval mode normalises with running stats, train mode with batch stats: different logits."""
    model = _model()
    x, _ = _batch()
    with attack_bn_mode(model, 'eval'):
        a = model(x)
    with attack_bn_mode(model, 'train'):
        b = model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_normalised_path_equals_pixel_path(norm):
    """Attacking normalised input with mean/std == attacking a model that normalises inside."""
    model = _model().eval()
    x, y = _batch()
    eps = 8 / 255 if norm == 'linf' else 0.5
    norm_ = PixelNormalizer(MEAN, STD)
    torch.manual_seed(3)
    adv_norm = PGDAttack(eps, steps=3, norm=norm, mean=MEAN, std=STD)(model, norm_.from_pixel(x), y)
    torch.manual_seed(3)
    adv_pix = PGDAttack(eps, steps=3, norm=norm)(PixelSpaceModel(model, MEAN, STD), x, y)
    assert torch.allclose(norm_.to_pixel(adv_norm), adv_pix, atol=1e-5)


@pytest.mark.parametrize('how', ['random', 'least_likely', 'explicit'])
def test_targeted_moves_toward_target(how):
    model, x, y = _trained_model()
    with torch.no_grad():
        clean_logits = model(x)
    if how == 'explicit':
        goal = (y + 3) % 10
        attack = PGDAttack(0.2, steps=10)
        x_adv = attack(model, x, y, attack_target=goal)
    else:
        torch.manual_seed(0)
        attack = PGDAttack(0.2, steps=10, targeted=how)
        x_adv = attack(model, x, y)
        if how == 'least_likely':
            goal = clean_logits.argmin(1)
        else:  # the goals are drawn first: replay the same draws
            torch.manual_seed(0)
            goal = (y + torch.randint(1, 10, y.shape)) % 10
    assert (goal != y).all()
    with torch.no_grad():
        adv_logits = model(x_adv)
    p_clean = clean_logits.softmax(1).gather(1, goal[:, None])
    p_adv = adv_logits.softmax(1).gather(1, goal[:, None])
    assert (p_adv > p_clean).float().mean() >= 0.9
    with torch.no_grad():  # the same budget untargeted lands on the goal class far less often
        untargeted_logits = model(PGDAttack(0.2, steps=10)(model, x, y))
    logp_targeted = adv_logits.log_softmax(1).gather(1, goal[:, None]).mean()
    logp_untargeted = untargeted_logits.log_softmax(1).gather(1, goal[:, None]).mean()
    assert logp_targeted > logp_untargeted + 1.0


def test_soft_targets():
    model, x, y = _trained_model()
    soft = F.one_hot(y, 10).float() * 0.8 + 0.02
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
    x_adv = PGDAttack(8 / 255, steps=3)(model, x, soft)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > clean_loss


def test_restarts_never_weaker_than_single_run():
    model, x, y = _trained_model()
    torch.manual_seed(5)
    single = PGDAttack(2 / 255, steps=2)(model, x, y)
    torch.manual_seed(5)
    multi = PGDAttack(2 / 255, steps=2, restarts=3)(model, x, y)
    with torch.no_grad():
        loss_single = F.cross_entropy(model(single), y, reduction='none')
        loss_multi = F.cross_entropy(model(multi), y, reduction='none')
        wrong_single = (model(single).argmax(1) != y).sum()
        wrong_multi = (model(multi).argmax(1) != y).sum()
    assert wrong_multi >= wrong_single
    assert loss_multi.sum() >= loss_single.sum() - 1e-4


def test_amp_bfloat16_cpu():
    model = _model().eval()
    x, y = _batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x_adv = PGDAttack(8 / 255, steps=2)(model, x, y)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-5


def _record_dtypes(model):
    """Forward-output and output-gradient dtypes of every conv / linear while the attack runs."""
    seen = {'forward': set(), 'grad': set()}

    def hook(module, args, output):
        seen['forward'].add(output.dtype)
        if output.requires_grad:
            output.register_hook(lambda g: seen['grad'].add(g.dtype))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize('autocast', [False, True])
def test_attack_precision_under_autocast(autocast):
    """Inside a training autocast the attack runs in fp32 (as the official DAT / PGD-AT codes), or in the
    autocast dtype when asked; the same holds for the AdvBN and FGSM-SDI paths through the core."""
    from timm_adv.attacks import FeatureStatsAttack, input_gradient
    model = _model('test_resnet').eval()
    seen = _record_dtypes(model)
    x, y = _batch(4)
    want = torch.bfloat16 if autocast else torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        PGDAttack(8 / 255, steps=1, autocast=autocast)(model, x, y)
    assert seen == {'forward': {want}, 'grad': {want}}
    seen['forward'].clear(), seen['grad'].clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        input_gradient(model, x, torch.zeros_like(x), y, PixelNormalizer(None, None), autocast=autocast)
    assert seen == {'forward': {want}, 'grad': {want}}
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    head(x)
    seen = _record_dtypes(head)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        feature = x.to(torch.bfloat16)  # a feature made under the training autocast
        FeatureStatsAttack(steps=1, autocast=autocast).perturb(head, head, feature, y)
    assert seen == {'forward': {want}, 'grad': {want}}


def test_fgsm_is_one_step_of_eps():
    model = _model().eval()
    x, y = _batch()
    x = x.clamp(0.1, 0.9)  # away from the box so the signed step is not clipped
    x_adv = create_attack(0.05, steps=1, random_start=False)(model, x, y)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.05), atol=1e-6)


def test_ddp_attack_does_not_sync_or_touch_grads():
    from torch.nn.parallel import DistributedDataParallel as DDP
    store_file = tempfile.mktemp()
    dist.init_process_group('gloo', init_method=f'file://{store_file}', rank=0, world_size=1)
    try:
        model = DDP(_model())
        x, y = _batch()
        calls = []
        model.register_comm_hook(None, lambda _, bucket: calls.append(1) or _fut(bucket.buffer()))
        PGDAttack(8 / 255, steps=2, bn_mode='train')(model, x, y)
        assert calls == [] and all(p.grad is None for p in model.parameters())
        F.cross_entropy(model(x), y).backward()  # a real training step does sync
        assert calls
    finally:
        dist.destroy_process_group()
        if os.path.exists(store_file):
            os.remove(store_file)


def _fut(t):
    f = torch.futures.Future()
    f.set_result(t)
    return f


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_random_start_on_sphere(norm):
    x = torch.rand(6, 3, 8, 8)
    delta = random_init(x, 0.1, norm, on_sphere=True)
    if norm == 'l2':
        assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((6,), 0.1), atol=1e-6)
    else:
        assert torch.allclose(delta.abs(), torch.full_like(x, 0.1))
    inside = random_init(x, 0.1, norm).flatten(1).norm(p=2 if norm == 'l2' else float('inf'), dim=1)
    assert (inside < 0.1).all()


def test_random_start_probability_is_one_draw_per_batch():
    class Recorder(nn.Module):  # zero input gradient: the returned delta is the starting point
        def forward(self, x):
            return x.flatten(1)[:, :10] * 0.0

    x, y = torch.rand(4, 3, 8, 8) * 0.8 + 0.1, torch.zeros(4, dtype=torch.long)
    attack = PGDAttack(0.1, steps=1, norm='l2', start_prob=0.8, start_on_sphere=True)
    torch.manual_seed(0)
    started = []
    for _ in range(400):
        delta = attack.perturb(Recorder(), x, y)
        norms = delta.flatten(1).norm(dim=1)
        assert torch.allclose(norms, norms[0].expand(4), atol=1e-5)  # every sample of a batch alike
        started.append(bool(norms[0] > 0.05))
    assert 0.74 < sum(started) / len(started) < 0.86
    assert not any(PGDAttack(0.1, steps=1, start_prob=0.0).perturb(Recorder(), x, y).abs().max() > 0 for _ in range(5))
    with pytest.raises(ValueError, match='start_prob'):
        PGDAttack(0.1, start_prob=1.5)


def test_knn_guided_attack_leaves_the_attack_it_is_given_alone():
    pgd = PGDAttack(0.03, steps=2)
    settings = dict(vars(pgd))
    guided = KNNGuidedAttack(pgd, num_guides=2)
    assert vars(pgd) == settings and guided.attack is not pgd
    assert guided.attack.loss_fn is guided_similarity_loss and guided.attack.steps == 2
    with pytest.raises(ValueError, match='^num_guides must be >= 1'):  # the parameter, not a flag
        KNNGuidedAttack(pgd, num_guides=0)


@pytest.mark.parametrize('bad', ['-1', '0', 'abc', '1/0'])
def test_parse_eps_rejects_bad_values(bad):
    with pytest.raises(ValueError, match='--adv-eps'):
        parse_eps(bad)


def test_parse_eps_fraction():
    assert parse_eps('4/255') == pytest.approx(4 / 255)


@pytest.mark.parametrize('kwargs,match', [
    (dict(eps=-0.1), 'eps'), (dict(eps=0.1, steps=0), 'steps'), (dict(eps=0.1, norm='l1'), 'norm'),
    (dict(eps=0.1, targeted='x'), 'targeting'), (dict(eps=0.1, bn_mode='foo'), 'BN mode'),
])
def test_attack_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGDAttack(**kwargs)

"""Dual BatchNorm layers: conversion, routing, stripping and SyncBatchNorm conversion."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, convert_sync_batchnorm
from timm.models.regnet import RegNet, RegNetCfg
from torch.nn.modules.batchnorm import _BatchNorm

from timm_adv.layers import (
    DualBatchNorm2d, aux_bn_state_dict, convert_dual_bn, dual_bn_layers, dual_bn_route, set_dual_bn_route,
    strip_aux_bn,
)

ARCHS = ['test_resnet', 'test_efficientnet', 'mobilenetv3_small_050', 'tiny_regnety']
NUM_CLASSES = 10


def _model(arch='test_resnet', seed=0):
    torch.manual_seed(seed)
    if arch == 'tiny_regnety':  # regnety_002 takes half a minute here; same blocks (SE, group conv), 33k params
        cfg = RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, stem_width=8, se_ratio=0.25)
        return RegNet(cfg, num_classes=NUM_CLASSES)
    return timm.create_model(arch, num_classes=NUM_CLASSES)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _diverge(model, x):
    """Trains main and auxiliary BNs on different data so that the two routes really differ."""
    model.train()
    with torch.no_grad(), dual_bn_route(model, 'split', split_size=x.shape[0] // 2):
        model(torch.cat([x, 3 * x + 1]))
    with torch.no_grad(), dual_bn_route(model, 'aux'):
        model(2 * x - 1)


@pytest.mark.parametrize('arch', ARCHS)
def test_convert_strip_roundtrip(arch):
    plain_keys = list(_model(arch).state_dict())
    model = convert_dual_bn(_model(arch))
    layers = dual_bn_layers(model)
    # every BN is wrapped; the auxiliary copy starts equal but owns its tensors
    assert len(layers) == sum(isinstance(m, _BatchNorm) for m in _model(arch).modules()) > 0
    wrapped = {id(d.main_bn) for d in layers} | {id(d.aux_bn[0]) for d in layers}
    assert all(id(m) in wrapped for m in model.modules() if isinstance(m, _BatchNorm))
    for d in layers:
        main, aux = d.main_bn, d.aux_bn[0]
        assert type(aux) is type(main)
        assert torch.equal(main.weight, aux.weight) and main.weight.data_ptr() != aux.weight.data_ptr()
        assert torch.equal(main.running_var, aux.running_var)
        if isinstance(main, BatchNormAct2d):  # activation and drop shared, applied on both routes
            assert aux.act is main.act and aux.drop is main.drop

    sd = model.state_dict()
    aux_keys = [k for k in sd if 'aux_bn' in k]
    assert [k for k in sd if 'aux_bn' not in k] == plain_keys
    assert aux_keys and all('.aux_bn.0.' in k for k in aux_keys)
    assert list(aux_bn_state_dict(model)) == aux_keys

    x, _ = _batch(4)
    _diverge(model, x)
    model.eval()
    out_dual = model(x)
    with dual_bn_route(model, 'aux'):
        out_aux = model(x)
    assert not torch.equal(out_dual, out_aux)

    plain = _model(arch, seed=1)
    plain.load_state_dict(strip_aux_bn(model.state_dict()), strict=True)
    stripped = strip_aux_bn(copy.deepcopy(model))
    assert not dual_bn_layers(stripped)
    assert list(stripped.state_dict()) == plain_keys
    assert torch.equal(plain.eval()(x), out_dual)
    assert torch.equal(stripped(x), out_dual)

    # the dual state dict loads strictly into a freshly converted model, both routes restored
    again = convert_dual_bn(_model(arch, seed=2))
    again.load_state_dict(model.state_dict(), strict=True)
    again.eval()
    assert torch.equal(again(x), out_dual)
    with dual_bn_route(again, 'aux'):
        assert torch.equal(again(x), out_aux)


def test_split_route_sends_each_part_through_its_bn():
    layer = DualBatchNorm2d(nn.BatchNorm2d(3, momentum=1.0))  # momentum 1: running stats = last batch stats
    a, b = torch.randn(4, 3, 5, 5), torch.randn(2, 3, 5, 5) * 3 + 7
    ref_main, ref_aux = copy.deepcopy(layer.main_bn), copy.deepcopy(layer.aux_bn[0])
    layer.route, layer.split_size = 'split', 4
    out = layer(torch.cat([a, b]))
    assert torch.equal(out, torch.cat([ref_main(a), ref_aux(b)]))
    torch.testing.assert_close(layer.main_bn.running_mean, a.mean((0, 2, 3)))
    torch.testing.assert_close(layer.aux_bn[0].running_mean, b.mean((0, 2, 3)))


@pytest.mark.parametrize('route, main_steps, aux_steps', [('main', 1, 0), ('aux', 0, 1), ('split', 1, 1)])
def test_model_wide_route(route, main_steps, aux_steps):
    model = convert_dual_bn(_model('test_efficientnet')).train()
    x, _ = _batch(4)
    with dual_bn_route(model, route, split_size=2 if route == 'split' else None):
        model(x)
    for d in dual_bn_layers(model):
        assert int(d.main_bn.num_batches_tracked) == main_steps
        assert int(d.aux_bn[0].num_batches_tracked) == aux_steps
        assert d.route == 'main'  # restored on exit


def test_route_errors():
    model = convert_dual_bn(_model())
    with pytest.raises(ValueError, match='choose one of main, aux, split'):
        set_dual_bn_route(model, 'adv')
    with pytest.raises(ValueError, match='split_size'):
        set_dual_bn_route(model, 'split')
    with pytest.raises(ValueError, match='convert_dual_bn'):
        set_dual_bn_route(_model(), 'aux')
    set_dual_bn_route(model, 'split', split_size=9)
    with pytest.raises(ValueError, match='batch of 4'):
        model(_batch(4)[0])


def test_sync_batchnorm_conversion(monkeypatch):
    from timm.utils import distribute_bn
    model = convert_dual_bn(_model('test_efficientnet'))
    x, _ = _batch(4)
    _diverge(model, x)
    keys = list(model.state_dict())
    model.eval()
    ref_main = model(x)
    with dual_bn_route(model, 'aux'):
        ref_aux = model(x)

    synced = convert_sync_batchnorm(model)
    for d in dual_bn_layers(synced):
        assert isinstance(d.main_bn, nn.SyncBatchNorm) and isinstance(d.aux_bn[0], nn.SyncBatchNorm)
        if hasattr(d.main_bn, 'act'):
            assert d.aux_bn[0].act is d.main_bn.act
    assert list(synced.state_dict()) == keys
    assert torch.equal(synced(x), ref_main)
    with dual_bn_route(synced, 'aux'):
        assert torch.equal(synced(x), ref_aux)
    synced.train()
    with dual_bn_route(synced, 'split', split_size=2):
        synced(x)  # without a process group SyncBN normalises locally
    plain = _model('test_efficientnet', seed=1)
    plain.load_state_dict(strip_aux_bn(synced.state_dict()), strict=True)

    torch_synced = nn.SyncBatchNorm.convert_sync_batchnorm(convert_dual_bn(_model()))
    assert all(isinstance(d.aux_bn[0], nn.SyncBatchNorm) for d in dual_bn_layers(torch_synced))

    # distribute_bn reaches the auxiliary running statistics too
    reduced = []
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda t, op=None: reduced.append(t.data_ptr()))
    distribute_bn(synced, world_size=2, reduce=True)
    for d in dual_bn_layers(synced):
        for bn in (d.main_bn, d.aux_bn[0]):
            assert bn.running_mean.data_ptr() in reduced and bn.running_var.data_ptr() in reduced


def test_dual_bns_convert_to_sync_bn():
    # --sync-bn converts both BN sets of the back (SyncBatchNorm needs a GPU to run; the conversion does not)
    import timm
    from timm_adv.layers import dual_bn_layers, insert_advbn
    model = insert_advbn(timm.create_model('test_resnet', num_classes=4), input_size=(3, 16, 16))
    n = len(dual_bn_layers(model))
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dual = dual_bn_layers(model)
    assert len(dual) == n and all(isinstance(m.main_bn, torch.nn.SyncBatchNorm) and
                                  isinstance(m.aux_bn[0], torch.nn.SyncBatchNorm) for m in dual)

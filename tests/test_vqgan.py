"""VQGAN discretiser: shapes, nearest-code quantiser, checkpoint formats and sources, bad input."""
import argparse
import os

import pytest
import torch
import yaml

from timm_adv.hub import populate_hf_cache
from timm_adv.vqgan import (VQGANConfig, VQModel, compare_precision, create_vqgan, load_vqgan_config,
                            load_vqgan_weights, save_vqgan)
from timm_adv.vqgan import model as vq_model

TINY = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3, resolution=16,
            z_channels=4, double_z=False, dropout=0.0)


def _tiny_model(n_embed=64, seed=0):
    """A tiny VQGAN whose codebook is spread over its encoder's latents, so codes vary across images."""
    torch.manual_seed(seed)
    model = VQModel(VQGANConfig(embed_dim=4, n_embed=n_embed, ddconfig=dict(TINY)))
    with torch.no_grad():
        h = model.encode_latent(torch.rand(8, 3, 16, 16) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 4)
        model.quantize.embedding.weight.copy_(h[torch.randperm(h.shape[0])[:n_embed]])
    return model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('vq') / 'tiny')
    save_vqgan(_tiny_model(), folder, metadata={'note': 'test'})
    return folder


@pytest.fixture(scope='module')
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16)


def test_shapes_range_and_decode_of_encode_is_reconstruct(saved, images):
    vq = create_vqgan(saved)
    codes = vq.encode(images)
    assert vq.downsample_factor == 2
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 64 and codes.unique().numel() > 1
    rec = vq.reconstruct(images)
    assert rec.shape == images.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    assert torch.equal(vq.decode(codes), rec)
    assert torch.equal(vq(images), rec)


def test_frozen_eval_and_no_grad(saved, images):
    vq = create_vqgan(saved)
    assert not any(p.requires_grad for p in vq.parameters())
    container = torch.nn.Sequential(vq)
    container.train()
    assert not vq.training and not any(m.training for m in vq.modules())
    out = vq.reconstruct(images.clone().requires_grad_(True))
    assert out.grad_fn is None and not out.requires_grad


def test_quantiser_returns_nearest_codebook_entry(saved, images, monkeypatch):
    vq = create_vqgan(saved)
    with torch.no_grad():
        h = vq.model.encode_latent(images * 2 - 1)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 4).double()
    brute = torch.cdist(flat, vq.model.quantize.embedding.weight.double()).argmin(1).reshape(3, 8, 8)
    assert torch.equal(vq.encode(images), brute)
    monkeypatch.setattr(vq_model, '_MAX_DISTANCES', 8 * 8 * 64)  # one image per chunk
    assert torch.equal(vq.encode(images), brute)


def test_reload_from_path_local_dir_and_offline_hf_cache(saved, images, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    reference = create_vqgan(saved).reconstruct(images)
    cache = str(tmp_path / 'hub')
    populate_hf_cache(saved, 'test-org/tiny_vqgan', cache)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', cache)
    for name in (os.path.join(saved, 'config.yaml'), os.path.join(saved, 'model.safetensors'),
                 'local-dir:' + saved, 'hf-hub:test-org/tiny_vqgan'):
        vq = create_vqgan(name)
        assert torch.equal(vq.reconstruct(images), reference), name
        assert vq.describe()['weights_sha256'] == create_vqgan(saved).weights_sha256


def test_taming_ckpt_layout_ignores_loss_keys(saved, images, tmp_path):
    """taming's download layout: configs/model.yaml + checkpoints/last.ckpt holding Lightning's 'state_dict'."""
    model = create_vqgan(saved).model
    state = dict(model.state_dict(), **{'loss.discriminator.main.0.weight': torch.zeros(2)})
    os.makedirs(tmp_path / 'configs')
    os.makedirs(tmp_path / 'checkpoints')
    with open(tmp_path / 'configs' / 'model.yaml', 'w') as f:
        yaml.safe_dump(dict(model=dict(params=dict(model.config.params(), lossconfig=dict(target='x.Loss')))), f)
    torch.save({'state_dict': state, 'global_step': 7}, tmp_path / 'checkpoints' / 'last.ckpt')
    for name in (str(tmp_path), str(tmp_path / 'checkpoints' / 'last.ckpt')):
        assert torch.equal(create_vqgan(name).reconstruct(images), create_vqgan(saved).reconstruct(images))


def test_weights_that_do_not_fit_the_config_fail_naming_both(saved, tmp_path):
    other = VQGANConfig(embed_dim=4, n_embed=32, ddconfig=dict(TINY), source='other.yaml')
    with pytest.raises(ValueError, match=r"model\.safetensors.*do not fit config 'other\.yaml'.*quantize\.embedding"):
        load_vqgan_weights(VQModel(other), os.path.join(saved, 'model.safetensors'))
    state = create_vqgan(saved).model.state_dict()
    state.pop('decoder.conv_out.bias')
    torch.save({'state_dict': state}, tmp_path / 'cut.ckpt')
    with pytest.raises(ValueError, match=r'cut\.ckpt.*1 missing keys \(e\.g\. decoder\.conv_out\.bias\)'):
        create_vqgan(str(tmp_path / 'cut.ckpt'), config=os.path.join(saved, 'config.yaml'))


class LightningCallback:
    """Stands for the ``pytorch_lightning`` objects a Lightning ``.ckpt`` pickles beside the weights."""
    restored = False

    def __setstate__(self, state):
        LightningCallback.restored = True


class RunsCode:
    def __reduce__(self):
        return os.system, ('true',)


def test_training_objects_load_inert_and_code_needs_explicit_trust(saved, images, tmp_path):
    """A Lightning checkpoint loads without unsafe_pickle (its objects never built); code-running pickles refuse."""
    state = create_vqgan(saved).model.state_dict()
    config = os.path.join(saved, 'config.yaml')
    torch.save({'state_dict': state, 'hparams': argparse.Namespace(lr=1.0), 'callbacks': {'cb': LightningCallback()}},
               tmp_path / 'pl.ckpt')
    vq = create_vqgan(str(tmp_path / 'pl.ckpt'), config=config)
    assert not LightningCallback.restored
    assert torch.equal(vq.reconstruct(images), create_vqgan(saved).reconstruct(images))
    torch.save({'state_dict': state, 'x': RunsCode()}, tmp_path / 'code.ckpt')
    with pytest.raises(ValueError, match='unsafe_pickle=True'):
        create_vqgan(str(tmp_path / 'code.ckpt'), config=config)


def test_preset_reads_its_cache_folder_and_says_what_goes_where(saved, images, tmp_path, monkeypatch, capsys):
    from timm_adv.vqgan import VQGAN_PRESETS, preset_folder
    from timm_adv.vqgan.__main__ import main
    monkeypatch.setenv('TIMM_ADV_HOME', str(tmp_path / 'home'))
    tiny = dict(params=create_vqgan(saved).config.params(), weights='https://example.org/tiny.zip',
                files=('model.safetensors', 'model.ckpt'))
    monkeypatch.setitem(VQGAN_PRESETS, 'tiny-f2', tiny)
    folder = tmp_path / 'home' / 'vqgan' / 'tiny-f2'
    assert preset_folder('tiny-f2') == str(folder)
    with pytest.raises(ValueError) as e:
        create_vqgan('tiny-f2')
    message = str(e.value)
    assert str(folder) in message and 'https://example.org/tiny.zip' in message
    assert 'python -m timm_adv.vqgan convert <file.ckpt> --config tiny-f2' in message
    assert '--adv-dat-vqgan-config tiny-f2' in message
    torch.save({'state_dict': create_vqgan(saved).model.state_dict()}, tmp_path / 'download.ckpt')
    main(['convert', str(tmp_path / 'download.ckpt'), '--config', 'tiny-f2'])  # --out: the preset's folder
    assert sorted(os.listdir(folder)) == ['config.yaml', 'model.safetensors']
    vq = create_vqgan('tiny-f2')
    assert vq.weights == str(folder / 'model.safetensors')
    assert torch.equal(vq.reconstruct(images), create_vqgan(saved).reconstruct(images))


def test_bad_sources_fail_clearly(tmp_path, saved, monkeypatch):
    monkeypatch.setenv('TIMM_ADV_HOME', str(tmp_path))  # no vq-f8 weights in its cache folder
    with pytest.raises(ValueError, match='Unknown VQGAN'):
        create_vqgan('vq-f9')
    with pytest.raises(ValueError, match='ommer-lab.com'):
        create_vqgan('vq-f8')
    with pytest.raises(ValueError, match='lacks a config .* and a weights file'):
        create_vqgan('local-dir:' + str(tmp_path))
    with pytest.raises(ValueError, match='no config found'):
        torch.save({}, tmp_path / 'lonely.ckpt')
        create_vqgan(str(tmp_path / 'lonely.ckpt'))
    with pytest.raises(ValueError, match='GroupNorm'):
        VQGANConfig(embed_dim=4, n_embed=8, ddconfig=dict(TINY, ch=16))
    with pytest.raises(ValueError, match='double_z'):
        VQGANConfig(embed_dim=4, n_embed=8, ddconfig=dict(TINY, double_z=True))


def test_presets_match_published_architectures():
    f8 = create_vqgan('vq-f8', pretrained=False)
    assert f8.downsample_factor == 8 and f8.n_embed == 16384
    assert f8.model.quantize.embedding.weight.shape == (16384, 4)
    assert len(f8.model.encoder.down[3].attn) == 2 and len(f8.model.encoder.down[2].attn) == 0  # attention at 32 px
    f16 = load_vqgan_config('vqgan_imagenet_f16_1024')
    assert f16.downsample_factor == 16 and f16.n_embed == 1024 and f16.embed_dim == 256


def _official_vq_f8_layout():
    """{key: shape} of the official vq-f8 VQModel (latent-diffusion's model, built as EasyRobust's DAT does), written
    from the official module code: ResnetBlock norm1/conv1/norm2/conv2 (+ nin_shortcut when the width changes), no
    timestep projection; AttnBlock norm/q/k/v/proj_out (1x1); Downsample / Upsample conv 3x3; encoder levels of
    num_res_blocks blocks, decoder levels of num_res_blocks + 1, attention where the running resolution (from 256)
    is in attn_resolutions; 1x1 quant_conv / post_quant_conv and the codebook."""
    ch, mult, blocks, z, embed, codes, attn_at = 128, (1, 2, 2, 4), 2, 4, 4, 16384, (32,)
    keys = {}

    def conv(name, cin, cout, k):
        keys[f'{name}.weight'], keys[f'{name}.bias'] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f'{name}.weight'], keys[f'{name}.bias'] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f'{name}.norm1', cin), conv(f'{name}.conv1', cin, cout, 3)
        norm(f'{name}.norm2', cout), conv(f'{name}.conv2', cout, cout, 3)
        if cin != cout:
            conv(f'{name}.nin_shortcut', cin, cout, 1)

    def attn(name, c):
        norm(f'{name}.norm', c)
        for part in ('q', 'k', 'v', 'proj_out'):
            conv(f'{name}.{part}', c, c, 1)

    def middle(prefix, c):
        resblock(f'{prefix}.mid.block_1', c, c), attn(f'{prefix}.mid.attn_1', c), resblock(f'{prefix}.mid.block_2', c, c)

    conv('encoder.conv_in', 3, ch, 3)
    res, block_in = 256, ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resblock(f'encoder.down.{i}.block.{j}', block_in, ch * m)
            block_in = ch * m
            if res in attn_at:
                attn(f'encoder.down.{i}.attn.{j}', block_in)
        if i != len(mult) - 1:
            conv(f'encoder.down.{i}.downsample.conv', block_in, block_in, 3)
            res //= 2
    middle('encoder', block_in)
    norm('encoder.norm_out', block_in), conv('encoder.conv_out', block_in, z, 3)
    block_in, res = ch * mult[-1], 256 // 2 ** (len(mult) - 1)
    conv('decoder.conv_in', z, block_in, 3)
    middle('decoder', block_in)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            resblock(f'decoder.up.{i}.block.{j}', block_in, ch * mult[i])
            block_in = ch * mult[i]
            if res in attn_at:
                attn(f'decoder.up.{i}.attn.{j}', block_in)
        if i != 0:
            conv(f'decoder.up.{i}.upsample.conv', block_in, block_in, 3)
            res *= 2
    norm('decoder.norm_out', block_in), conv('decoder.conv_out', block_in, 3, 3)
    keys['quantize.embedding.weight'] = (codes, embed)
    conv('quant_conv', z, embed, 1), conv('post_quant_conv', embed, z, 1)
    return keys


def test_vq_f8_state_dict_matches_the_official_layout_key_for_key():
    """Our vq-f8 model (meta device, no weights) has exactly the official checkpoint's keys and shapes."""
    official = _official_vq_f8_layout()
    assert len(official) == 299 and sum(torch.Size(s).numel() for s in official.values()) == 67_717_295  # pinned
    with torch.device('meta'):
        ours = VQModel(load_vqgan_config('vq-f8')).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == official


def test_config_without_double_z_builds_a_vqgan(images):
    # taming's Encoder defaults to double_z=True; a config that omits the key must still encode
    ddconfig = {k: v for k, v in TINY.items() if k != 'double_z'}
    model = VQModel(VQGANConfig(embed_dim=4, n_embed=16, ddconfig=ddconfig))
    assert model.encode_latent(images * 2 - 1).shape == (3, 4, 8, 8)


def test_bad_images_and_codes_fail_clearly(saved, images):
    vq = create_vqgan(saved)
    with pytest.raises(ValueError, match=r'in \[0, 1\].*clamp'):
        vq.reconstruct(images * 2 - 1)
    with pytest.raises(ValueError, match=r'in \[0, 1\]'):
        vq.encode(torch.full_like(images, float('nan')))
    with pytest.raises(ValueError, match='multiples of 2'):
        vq.encode(images[..., :15])
    with pytest.raises(ValueError, match=r'\[0, 64\)'):
        vq.decode(torch.full((1, 8, 8), 64, dtype=torch.long))


def test_bf16_channels_last_and_describe(saved, images):
    vq = create_vqgan(saved)
    reference, codes = vq.reconstruct(images), vq.encode(images)
    vq.set_channels_last(True)
    assert vq.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (vq.encode(images) == codes).float().mean() > 0.95
    stats = compare_precision(vq, images)
    assert not vq.bf16  # restored
    assert stats['code_agreement'] > 0.5 and 0 < stats['max_abs_pixel_error'] < 1
    assert stats['decode_max_abs_error'] < 0.1
    bf = create_vqgan(saved, bf16=True)
    assert (bf.reconstruct(images) - reference).abs().mean() < 0.05
    desc = bf.describe()
    assert desc['bf16'] and desc['downsample_factor'] == 2 and desc['config']['n_embed'] == 64
    assert yaml.safe_load(yaml.safe_dump(desc)) == desc  # plain types: fits a checkpoint's task state


def test_quantiser_in_fp32_under_bf16_and_channels_last_reaches_the_output(saved, images):
    """Under a bf16 autocast (the VQGAN's own or the training's) codebook distances stay fp32; with channels_last
    every encoder / decoder layer runs in it and the decoded images come out in it."""
    vq = create_vqgan(saved, bf16=True, channels_last=True)
    seen = {'quantize': set(), 'conv_in': set()}
    vq.model.quantize.register_forward_pre_hook(lambda m, a: seen['quantize'].add(a[0].dtype))
    for name in ('encoder', 'decoder'):
        conv = getattr(vq.model, name).conv_out
        conv.register_forward_pre_hook(lambda m, a: seen['conv_in'].add(a[0].is_contiguous(
            memory_format=torch.channels_last)))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = vq.reconstruct(images)
    assert seen == {'quantize': {torch.float32}, 'conv_in': {True}}
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    vq.set_channels_last(False)
    assert vq.reconstruct(images).is_contiguous()


def test_chunked_passes_equal_the_whole_batch_and_bound_memory(saved):
    from timm_adv.vqgan import chunk_for_budget, peak_memory_bytes, vqgan_activation_bytes
    torch.manual_seed(2)
    x = torch.rand(6, 3, 32, 32)
    whole = create_vqgan(saved)
    codes, rec = whole.encode(x), whole.reconstruct(x)
    chunked = create_vqgan(saved, chunk_size=4)
    chunked.static_batch = True  # the last chunk of 2 padded to 4, as a compiled VQGAN runs it
    assert torch.equal(chunked.encode(x), codes) and torch.allclose(chunked.reconstruct(x), rec, atol=1e-5)
    est = vqgan_activation_bytes(whole.config, 32, 32)
    cpu = torch.device('cpu')
    by_chunk = {n: create_vqgan(saved, chunk_size=n) for n in (1, 6)}
    measured = {n: peak_memory_bytes(lambda: vq.encode(x), cpu) for n, vq in by_chunk.items()}
    assert measured[1] < measured[6] / 2  # the encoder's kept activations scale with the chunk
    per_image = peak_memory_bytes(lambda: whole.encode(x), cpu) / 6
    assert 0.5 < est['encode'] / per_image < 2.0, (est, per_image)
    assert chunk_for_budget(est, 10.5 * max(est.values())) == 10 and chunk_for_budget(est, 1) == 1


def test_compiled_vqgan_compiles_once_whatever_the_batch(saved):
    """DAT decodes a different number of samples each step: after the first batch nothing recompiles."""
    from timm_adv.augment import compile_vqgan
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(t.shape[0] for t in example_inputs if torch.is_tensor(t) and t.ndim == 4))
        return gm.forward
    torch._dynamo.reset()
    vq = compile_vqgan(create_vqgan(saved), backend=counting_backend)
    torch.manual_seed(3)
    x = torch.rand(4, 3, 16, 16)
    reference = create_vqgan(saved)
    codes = vq.encode(x)
    vq.decode(codes)
    warm = len(graphs)
    for n in (1, 3, 4, 2):
        assert torch.equal(vq.encode(x[:n]), reference.encode(x[:n]))
        assert torch.allclose(vq.decode(codes[:n]), reference.decode(codes[:n]), atol=1e-5)
    assert warm >= 2 and len(graphs) == warm and vq.chunk_size == 4
    torch._dynamo.reset()


# ---------------------------------------------------------------- fit

def _fit_args(out, *extra):
    from timm_adv.vqgan.__main__ import _parser
    tiny = ['fit', '--out', str(out), '--img-size', '16', '--ch-mult', '1', '1', '-b', '8', '--n-embed', '16',
            '--val-samples', '64', '--grid-images', '4']
    return _parser().parse_args(tiny + list(extra))


def test_fit_lowers_error_uses_codes_and_saves_a_loadable_folder(tmp_path):
    from timm_adv.vqgan.fit import evaluate_vqgan, fit_vqgan
    out = tmp_path / 'fit'
    result = fit_vqgan(_fit_args(out, '--steps', '40', '--eval-every', '5', '--lr', '2e-3'))
    history = [m['psnr'] for m in yaml.safe_load(open(out / 'metrics.json'))]
    assert len(history) == 8 and history[-1] > history[0] + 2, history
    assert result['codes_used'] > 1
    assert sorted(os.listdir(out)) == ['config.yaml', 'last.pth', 'metrics.json', 'model.safetensors',
                                       'reconstructions.png']
    vq = create_vqgan(str(out))
    recorded = yaml.safe_load(open(out / 'config.yaml'))['timm_adv']['fit']
    from timm_adv.vqgan.fit import _datasets
    again = evaluate_vqgan(vq, _datasets(_fit_args(out))[1])
    assert again['psnr'] == pytest.approx(recorded['psnr'], abs=1e-6) and again['codes_used'] == recorded['codes_used']
    from PIL import Image
    assert Image.open(out / 'reconstructions.png').size == (4 * 17 + 1, 2 * 17 + 1)


def test_fit_resume_replays_the_interrupted_run(tmp_path):
    from timm_adv.vqgan.fit import fit_vqgan
    from safetensors.torch import load_file
    common = ['--dead-code-every', '2', '--disc-weight', '0.1', '--disc-start', '2', '--eval-every', '3',
              '--val-samples', '8']
    fit_vqgan(_fit_args(tmp_path / 'straight', '--steps', '6', *common))
    fit_vqgan(_fit_args(tmp_path / 'resumed', '--steps', '3', *common))
    with pytest.raises(ValueError, match='already holds a fit'):
        fit_vqgan(_fit_args(tmp_path / 'resumed', '--steps', '6', *common))
    with pytest.raises(ValueError, match='--lr is 0.5 but the run'):
        fit_vqgan(_fit_args(tmp_path / 'resumed', '--steps', '6', '--resume', '--lr', '0.5', *common))
    fit_vqgan(_fit_args(tmp_path / 'resumed', '--steps', '6', '--resume', *common))
    a = load_file(str(tmp_path / 'straight' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'resumed' / 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / 'resumed' / 'last.pth', weights_only=True)['step'] == 6


def test_fit_bad_input_fails_before_work(tmp_path, monkeypatch, capsys):
    import sys
    import types
    from timm_adv.vqgan.__main__ import main
    from timm_adv.vqgan.fit import fit_vqgan
    with pytest.raises(ValueError, match='--img-size 18 is not a multiple'):
        fit_vqgan(_fit_args(tmp_path / 'a', '--img-size', '18', '--ch-mult', '1', '1', '1'))
    with pytest.raises(ValueError, match='too few to fit --n-embed 100000'):
        fit_vqgan(_fit_args(tmp_path / 'a', '--n-embed', '100000'))
    with pytest.raises(ValueError, match='--disc-start has no effect'):
        fit_vqgan(_fit_args(tmp_path / 'a', '--disc-start', '5'))
    with pytest.raises(ValueError, match='--resume:.*does not exist'):
        fit_vqgan(_fit_args(tmp_path / 'a', '--resume'))
    with pytest.raises(ValueError, match='--ch / --ch-mult:.*GroupNorm'):
        fit_vqgan(_fit_args(tmp_path / 'a', '--ch', '48'))

    class _NoWeights:
        def __init__(self):
            raise OSError('no network to download vgg16')
    monkeypatch.setitem(sys.modules, 'taming.modules.losses.lpips', types.SimpleNamespace(LPIPS=_NoWeights))
    with pytest.raises(SystemExit):
        main(['fit', '--out', str(tmp_path / 'a'), '--perceptual-weight', '1'])
    assert '--perceptual-weight needs LPIPS' in capsys.readouterr().err
    assert not (tmp_path / 'a').exists()


def test_convert_cli_writes_safetensors_folder(saved, images, tmp_path, capsys):
    from timm_adv.vqgan.__main__ import main
    torch.save({'state_dict': create_vqgan(saved).model.state_dict()}, tmp_path / 'model.ckpt')
    main(['convert', str(tmp_path / 'model.ckpt'), '--config', os.path.join(saved, 'config.yaml'),
          '--out', str(tmp_path / 'converted')])
    assert torch.equal(create_vqgan(str(tmp_path / 'converted')).reconstruct(images),
                       create_vqgan(saved).reconstruct(images))
    meta = yaml.safe_load(open(tmp_path / 'converted' / 'config.yaml'))['timm_adv']
    assert meta['converted_from'].endswith('model.ckpt') and len(meta['source_sha256']) == 64

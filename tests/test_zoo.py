"""Importing published robust models (RobustBench, EasyRobust) as plain timm models.

The source packages are not needed: tools/zoo_fixtures.py built every supported entry with the
source's own code (robustbench 1.1.1; EasyRobust's timm 0.5.4 in a separate environment), filled it
with deterministic weights and pinned the weights file's layout and the source's outputs on two raw
images through the source's eval transform (tests/data/zoo). Here the same weights are regenerated
from the layout, imported, and compared. With robustbench installed, the import is also compared
with robustbench's own loader live.
"""
import gzip
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from timm_adv.hub.__main__ import main as hub_main
from timm_adv.hub.pipeline import load_hub_config, validate_command
from timm_adv.hub.zoo import REFUSED, ZOO, get_zoo_entry
from timm_adv.hub.zoo_import import (create_timm_model, entry_data_config, import_zoo_model, source_state_dict,
                                     timm_outputs)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))
from zoo_fixtures import (LAYOUTS, REFERENCES, fixture_images, image_digest, plain_timm_outputs,  # noqa: E402
                          seeded_state_dict, source_file)

with gzip.open(LAYOUTS, 'rt') as _f:
    LAYOUT = json.load(_f)
REFS = load_file(REFERENCES)
IMAGES = fixture_images(REFS)

# the smallest entry of each architecture family and source layout (the generator checked every entry once;
# test_every_entry_gets_the_source_eval_transform covers every entry's transform)
FAMILIES = [
    'robustbench:Salman2020Do_R18',  # torchvision ResNet, normalisation inside the model
    'robustbench:Debenedetti2022Light_XCiT-S12',  # robustbench's own timm registration, raw [0, 1] inputs
    'robustbench:Liu2023Comprehensive_ConvNeXt-B',
    'easyrobust:advtrain_swin_small_patch4_window7_224_ep4',  # timm 0.5.4 Swin layout through timm's Swin filter
    'easyrobust:advtrain_vit_small_patch16_224_ep4',
    'easyrobust:advtrain_efficientnet_b0_ep4',
    'easyrobust:advtrain_densenet121_ep4',
    'easyrobust:advprop_resnet50',  # auxiliary bn_adv BatchNorms dropped
]
with open(os.path.join(os.path.dirname(LAYOUTS), 'transforms.json')) as _f:
    TRANSFORM_DIGESTS = json.load(_f)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI sets up logging on the (captured) stderr of its test; later tests must not write to it."""
    import logging
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers


def _tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * (1.0 + float(reference.abs().max()))


def _weights_file(spec: str, path) -> str:
    return source_file(spec, LAYOUT[spec], str(path))


def test_every_supported_entry_is_pinned_and_maps_onto_its_timm_architecture():
    assert set(LAYOUT) == set(ZOO), 'rerun tools/zoo_fixtures.py for new registry entries'
    for spec, layout in LAYOUT.items():
        entry = ZOO[spec]
        checkpoint = {k: torch.tensor(layout['fixed'][k]) if k in layout['fixed'] else
                      torch.empty(shape, dtype=getattr(torch, dtype), device='meta')  # shapes only: fast
                      for k, (shape, dtype, _) in layout['keys'].items()}
        imported = source_state_dict(checkpoint, entry)
        with torch.device('meta'):
            create_timm_model(entry, imported)  # strict: raises ExportError naming a missing / unexpected key
        assert entry.layout == 'easyrobust-advprop' or not imported.dropped, spec


def test_registry_refuses_with_one_line_reason():
    with pytest.raises(ValueError, match='cannot be imported as a plain timm model: an ensemble'):
        get_zoo_entry('robustbench:Bai2024MixedNUTS')
    with pytest.raises(ValueError, match='Supported robustbench entries: .*Salman2020Do_R50'):
        get_zoo_entry('robustbench:NoSuchModel')
    with pytest.raises(ValueError, match='expected one of robustbench:<name>, easyrobust:<name>'):
        get_zoo_entry('Salman2020Do_R50')
    assert not set(REFUSED) & set(ZOO)
    assert all('\n' not in reason for reason in REFUSED.values())


def test_every_entry_gets_the_source_eval_transform():
    from timm.data import create_transform
    assert set(TRANSFORM_DIGESTS) == set(ZOO)
    for spec, entry in ZOO.items():  # the pixels before normalisation, byte for byte
        transform = create_transform(**dict(entry_data_config(entry), mean=(0.0,) * 3, std=(1.0,) * 3))
        assert image_digest([transform(img) for img in IMAGES]) == TRANSFORM_DIGESTS[spec], spec


@pytest.mark.parametrize('spec', FAMILIES)
def test_import_reproduces_the_source_outputs_on_raw_images(spec):
    entry = ZOO[spec]
    imported = source_state_dict(seeded_state_dict(LAYOUT[spec]), entry)
    model = create_timm_model(entry, imported)
    out = timm_outputs(model, IMAGES, entry_data_config(entry, imported))
    reference = REFS[spec]
    diff = float((out - reference).abs().max())
    print(f'{spec}: max |diff| {diff:.3g}, max |logit| {float(reference.abs().max()):.3g}')
    assert diff <= _tolerance(reference), spec
    if entry.layout == 'easyrobust-advprop':
        assert imported.dropped and all('.bn_adv.' in k for k in imported.dropped)


def test_import_cli_writes_a_folder_plain_timm_loads(tmp_path):
    spec = 'robustbench:Salman2020Do_R18'  # the file as robustbench's loader reads it: nested, 'module.' prefixes
    folder = str(tmp_path / 'hub')
    result = hub_main(['import', spec, '--out', folder, '--weights', _weights_file(spec, tmp_path / 'w.pt')])
    assert result['max_abs_diff'] == 0.0
    reference = REFS[spec]
    diff = float((plain_timm_outputs(folder, str(tmp_path / 'out.pt')) - reference).abs().max())
    print(f'{spec}: plain timm from the folder vs source: max |diff| {diff:.3g}')
    assert diff <= _tolerance(reference)

    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    entry = ZOO[spec]
    cfg = config['pretrained_cfg']
    assert config['architecture'] == entry.architecture and config['num_classes'] == 1000
    assert (tuple(cfg['mean']), tuple(cfg['std'])) == (entry.transform.mean, entry.transform.std)
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['license']) == (
        entry.transform.crop_pct, entry.transform.interpolation, entry.license)
    assert cfg['origin_url'] == entry.paper[1] and cfg.get('paper_ids') != 'arXiv:2110.00476'  # not timm's resnet
    assert config['timm_adv']['imported']['spec'] == spec and len(config['label_names']) == 1000
    card = open(os.path.join(folder, 'README.md')).read()
    assert 'imported by timm-adv, not trained by it' in card
    assert 'they were not measured by timm-adv on these weights' in card
    assert f'| Clean top-1 (ImageNet val) | {entry.published["clean"]}% |' in card
    assert f'| AutoAttack top-1 | {entry.published["autoattack"]}% |' in card
    assert '--protocol robustbench-imagenet' in card and entry.paper[1] in card


def test_import_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        hub_main(['import', 'robustbench:Singh2023Revisiting_ViT-B-ConvStem', '--weights', 'x.pt', '--out',
                  str(tmp_path / 'a')])
    assert 'convolutional stem' in capsys.readouterr().err
    wrong = _weights_file('robustbench:Salman2020Do_R18', tmp_path / 'r18.pt')
    with pytest.raises(SystemExit):
        hub_main(['import', 'robustbench:Salman2020Do_R50', '--weights', wrong, '--out', str(tmp_path / 'b')])
    err = capsys.readouterr().err
    assert 'the weights do not fit timm resnet50' in err and not os.path.exists(tmp_path / 'b')
    with pytest.raises(SystemExit):
        hub_main(['import', 'easyrobust:advtrain_vgg16_ep4', '--weights', str(tmp_path / 'none.pth'), '--out',
                  str(tmp_path / 'c')])
    assert '--weights' in capsys.readouterr().err


def test_zoo_listing_cli(capsys):
    listing = hub_main(['zoo', '--source', 'robustbench'])
    assert {e['spec'] for e in listing['supported']} == {s for s in ZOO if s.startswith('robustbench:')}
    assert any(r['spec'] == 'robustbench:Wong2020Fast' and '288' in r['reason'] for r in listing['refused'])


def test_imported_hub_configs():
    from timm_adv.cli import validate
    paths = [os.path.join(REPO, 'hub_configs', p) for p in sorted(os.listdir(os.path.join(REPO, 'hub_configs')))]
    imported = [load_hub_config(p) for p in paths if load_hub_config(p, check_method=False)['status'] == 'imported']
    assert {c['source'].split(':')[0] for c in imported} == {'robustbench', 'easyrobust'}
    for config in imported:
        entry = get_zoo_entry(config['source'])
        assert config['repo_id'] == f'timm-adv/{entry.hub_name}'
        args = validate.parse_args(validate_command(config, 'local-dir:/x', '/tmp/r')[1:])
        if entry.published.get('autoattack') is not None:  # re-measured with the source's protocol
            assert (args.autoattack, args.aa_norm, args.aa_samples) == ('standard', 'linf', 5000)
            assert abs(args.aa_eps - 4 / 255) < 1e-12


def test_pipeline_imports_evaluates_and_writes_the_card(tmp_path, monkeypatch):
    from timm_adv.hub import pipeline
    spec = 'easyrobust:advtrain_efficientnet_b0_ep4'
    config = tmp_path / 'imported.yaml'
    config.write_text(f'repo_id: me/effnet\nstatus: imported\nsource: {spec}\narchitecture: efficientnet_b0\n'
                      'dataset: null\ndata_dir: /data/imagenet\nlicense: apache-2.0\n'
                      'evaluation: {protocol: robustbench-imagenet, batch-size: 64}\n')
    runs = []

    def fake_validate(argv, log_path):  # validate.py on ImageNet: here its report only
        runs.append(argv)
        with open(os.path.join(argv[argv.index('--report-dir') + 1], 'robustness.json'), 'w') as f:
            json.dump(dict(model=argv[2], dataset='/data/imagenet', clean=dict(top1=61.5, top5=83.0, samples=50000)), f)
    monkeypatch.setattr(pipeline, '_run', fake_validate)
    path = _weights_file(spec, tmp_path / 'w.pth')

    def load_url(url, **kwargs):  # no weights file: the URL is read as EasyRobust's benchmark reads it
        assert url == ZOO[spec].weights and kwargs['weights_only']
        return torch.load(path, weights_only=True)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', load_url)
    result = pipeline.run_pipeline(str(config), str(tmp_path / 'out'))
    assert runs[0][:3] == ['validate.py', '--model', f'local-dir:{result["export_dir"]}']
    assert '--protocol' in runs[0] and '--data-dir' in runs[0] and result['max_abs_diff'] == 0.0
    card = open(result['model_card']).read()
    assert 'Measured by timm-adv on /data/imagenet' in card and '61.5' in card and '35.06%' in card
    with open(os.path.join(result['export_dir'], 'config.json')) as f:
        cfg = json.load(f)['pretrained_cfg']
    assert (cfg['interpolation'], cfg['crop_pct'], cfg['mean']) == ('bicubic', 0.875, [0.485, 0.456, 0.406])
    with pytest.raises(ValueError, match='imports as .efficientnet_b0., not .resnet50.'):
        config.write_text(config.read_text().replace('architecture: efficientnet_b0', 'architecture: resnet50'))
        load_hub_config(str(config))


def test_validate_protocol_preset_and_image_list(tmp_path, monkeypatch):
    import timm.data
    from timm_adv.cli import validate
    from PIL import Image
    from timm_adv.evaluation import image_list_subset
    args = validate.parse_args(['--protocol', 'robustbench-imagenet'])
    assert (args.autoattack, args.aa_norm, args.aa_samples) == ('standard', 'linf', 5000)
    with pytest.raises(SystemExit):
        validate.parse_args(['--protocol', 'robustbench-imagenet', '--aa-samples', '100'])
    for wnid in ('n01', 'n02'):
        os.makedirs(tmp_path / 'val' / wnid)
        for i in range(3):
            Image.new('RGB', (8, 8)).save(tmp_path / 'val' / wnid / f'ILSVRC2012_val_{wnid}{i}.JPEG')
    dataset = timm.data.create_dataset('', root=str(tmp_path / 'val'))
    subset = image_list_subset(dataset, ['n02/ILSVRC2012_val_n021.JPEG', 'n01/ILSVRC2012_val_n010.JPEG'])
    assert [dataset.filenames(basename=True)[i] for i in subset.indices] == [
        'ILSVRC2012_val_n021.JPEG', 'ILSVRC2012_val_n010.JPEG']
    with pytest.raises(ValueError, match='1 of the 2 listed images are not in the dataset'):
        image_list_subset(dataset, ['n01/ILSVRC2012_val_n010.JPEG', 'n03/missing.JPEG'])

    seen = {}  # validate.py runs AutoAttack on the listed images, with the preset's settings

    def fake_autoattack(model, loader, **kwargs):
        seen['indices'], seen['kwargs'] = list(loader.dataset.indices), kwargs
        return dict(version='standard', attacks=['apgd-ce'], norm='linf', eps=kwargs['eps'], robust_top1=0.0,
                    clean_top1=0.0, samples=2, iterations={'apgd-ce': 100})
    monkeypatch.setattr(validate, 'evaluate_autoattack', fake_autoattack)
    listing = tmp_path / 'ids.txt'
    listing.write_text('n02/ILSVRC2012_val_n022.JPEG\nn01/ILSVRC2012_val_n011.JPEG\n')
    results = validate.main(['--model', 'test_resnet', '--no-pretrained', '--data-dir', str(tmp_path / 'val'),
                             '--num-classes', '2',
                             '--img-size', '32', '--workers', '0', '--protocol', 'robustbench-imagenet',
                             '--aa-image-list', str(listing), '--report-dir', str(tmp_path / 'r'), '--no-plots'])
    assert [dataset.filenames(basename=True)[i] for i in seen['indices']] == [
        'ILSVRC2012_val_n022.JPEG', 'ILSVRC2012_val_n011.JPEG']
    assert seen['kwargs']['version'] == 'standard' and seen['kwargs']['norm'] == 'linf'
    with open(tmp_path / 'r' / 'robustness.json') as f:
        report = json.load(f)['autoattack']
    assert abs(seen['kwargs']['eps'] - 4 / 255) < 1e-12 and results['aa_samples'] == 2
    assert report['subset'] == 'listed images' and report['protocol'].startswith('RobustBench ImageNet L-inf')


def _robustbench():
    from timm_adv.hub.zoo_import import import_robustbench
    try:
        return import_robustbench()
    except ImportError:
        pytest.skip('robustbench is not installed (pip install --no-deps robustbench==1.1.1)')


def test_registry_covers_every_robustbench_imagenet_linf_entry():
    _robustbench()
    from robustbench.model_zoo.enums import ThreatModel
    from robustbench.model_zoo.imagenet import imagenet_models
    names = {f'robustbench:{n}' for n in imagenet_models[ThreatModel.Linf]}
    assert names == {s for s in list(ZOO) + list(REFUSED) if s.startswith('robustbench:')}


@pytest.mark.parametrize('spec', ['robustbench:Salman2020Do_R18'])
def test_live_import_matches_robustbench_own_loader(spec, tmp_path):
    """Random weights of the model robustbench builds, imported, against robustbench's loader and transform."""
    _robustbench()
    import timm
    from robustbench.model_zoo.enums import ThreatModel
    from robustbench.model_zoo.imagenet import imagenet_models
    entry = ZOO[spec]
    torch.manual_seed(0)
    timm_name = f'{entry.name.lower().replace("-", "_")}_imagenet_linf'
    source = timm.create_model(timm_name) if timm.is_model(timm_name) else \
        imagenet_models[ThreatModel.Linf][entry.name]['model']().model
    path = str(tmp_path / f'{entry.name}.pt')
    torch.save(source.state_dict(), path)
    result = import_zoo_model(spec, str(tmp_path / 'hub'), weights=path)
    print(f'{spec}: plain timm vs robustbench: max |diff| {result["source_max_abs_diff"]:.3g}')
    assert result['source_max_abs_diff'] is not None and result['source_max_abs_diff'] <= 1e-4

"""Export, offline Hub round trip, publishing, hub configs and model cards (the evaluation library: test_evaluation.py)."""
import argparse
import glob
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

from timm_adv.cli import train
from timm_adv.data import BundledMnist, apply_bundled_defaults, spread_subset
from timm_adv.evaluation import save_report
from timm_adv.hub import (ExportError, export_checkpoint, export_from_task, load_hub_config, method_reference,
                          populate_hf_cache, publish_folder, render_model_card, sample_batch, write_model_card)
from timm_adv.hub.pipeline import train_command, validate_command
from timm_adv.tasks import PGDTrainingTask, get_method, list_methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = 'test-org/test_resnet.pgd_mnist'
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=1.0, crop_mode='center',
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _train_args(model='test_resnet', method='pgd'):
    args, _ = train.parse_args(['--model', model, '--adv-method', method, '--adv-eps', '0.1', '--adv-steps', '2'])
    args.dataset = 'bundled/mnist'
    apply_bundled_defaults(args)
    return args


def _trained_like_model(args):
    """A model whose BN statistics and head are not at their init values (outputs depend on all of it)."""
    torch.manual_seed(0)
    model = get_method(args.adv_method).prepare_model(timm.create_model(args.model, num_classes=args.num_classes), args)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    nn.init.normal_(model.fc.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A checkpoint in the layout timm's CheckpointSaver writes for train.py, plus the model it holds."""
    root = tmp_path_factory.mktemp('run')
    args = _train_args()
    model = _trained_like_model(args)
    path = str(root / 'last.pth.tar')
    torch.save({'epoch': 0, 'arch': args.model, 'state_dict': model.state_dict(), 'args': args}, path)
    return path, model, args


@pytest.fixture(scope='module')
def exported(checkpoint, tmp_path_factory):
    path, model, _ = checkpoint
    folder = str(tmp_path_factory.mktemp('export') / 'test_resnet.pgd_mnist')
    result, _ = export_checkpoint(path, folder)
    write_model_card(folder, REPO_ID)
    return folder, result


def _offline_env(hf_home):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(hf_home), PYTHONPATH=REPO)
    env.pop('HF_HUB_CACHE', None)
    return env


# ---------------------------------------------------------------- export and round trip

def test_export_writes_plain_timm_config(exported):
    folder, result = exported
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors', 'training_args.yaml']
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    assert config['architecture'] == 'test_resnet' and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    cfg = config['pretrained_cfg']
    assert tuple(cfg['input_size']) == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['interpolation'] == 'bilinear' and cfg['license'] == 'apache-2.0'
    assert tuple(cfg['mean']) == tuple(timm.create_model('test_resnet').pretrained_cfg['mean'])  # training mean
    # training metadata only under the top-level key timm ignores
    assert config['timm_adv']['method'] == 'pgd' and config['timm_adv']['method_args']['adv_eps'] == 0.1
    assert not any(k.startswith('adv_') for k in cfg) and not any(k.startswith('adv_') for k in config.get('model_args', {}))
    assert result.max_abs_diff == 0.0


def test_local_dir_gives_trained_outputs(checkpoint, exported):
    _, model, _ = checkpoint
    folder, _ = exported
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = sample_batch(DATA_CONFIG, batch_size=4, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert tuple(loaded.pretrained_cfg['input_size']) == (3, 32, 32)  # a list with older timm


def test_offline_hub_cache_round_trip_and_validate(checkpoint, exported, tmp_path):
    _, model, _ = checkpoint
    folder, _ = exported
    populate_hf_cache(folder, REPO_ID, str(tmp_path / 'hf' / 'hub'))
    x = sample_batch(DATA_CONFIG, batch_size=4, seed=2)
    torch.save(x, tmp_path / 'x.pt')
    script = ('import sys, timm, torch\n'
              f"m = timm.create_model('hf-hub:{REPO_ID}', pretrained=True).eval()\n"
              "with torch.no_grad(): torch.save(m(torch.load(sys.argv[1])), sys.argv[2])\n")
    env = _offline_env(tmp_path / 'hf')
    run = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'x.pt'), str(tmp_path / 'y.pt')], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'y.pt'), model(x))

    # validate.py evaluates the hub model offline; same numbers as the local folder
    common = ['--num-samples', '32', '-b', '32', '--workers', '0', '--attack', 'pgd', '--eps', '0.1', '--steps', '2']
    run = subprocess.run([sys.executable, 'validate.py', '--model', f'hf-hub:{REPO_ID}', *common,
                          '--results-file', str(tmp_path / 'hub.json'), '--results-format', 'json',
                          '--report-dir', str(tmp_path / 'report')], env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    hub = json.load(open(tmp_path / 'hub.json'))[0]
    from timm_adv.cli import validate
    local = validate.main(['--model', f'local-dir:{folder}', *common])
    assert hub['top1'] == local['top1'] and hub['pgd2_top1'] == local['pgd2_top1'] and hub['samples'] == 32
    # ... and they are the trained model's numbers (its weights, not a fresh init)
    from timm.data import create_loader
    from timm_adv.evaluation import evaluate_accuracy
    cfg = model.pretrained_cfg
    loader = create_loader(spread_subset(BundledMnist('validation'), 32), input_size=(3, 32, 32),
                           batch_size=32, mean=cfg['mean'], std=cfg['std'], crop_pct=1.0, interpolation='bilinear',
                           use_prefetcher=False)
    expected = evaluate_accuracy(model, loader)
    assert hub['top1'] == pytest.approx(expected['top1'], abs=1e-3)
    assert hub['loss'] == pytest.approx(expected['loss'], abs=1e-4)
    report = json.load(open(tmp_path / 'report' / 'robustness.json'))
    assert report['clean']['top1'] == pytest.approx(hub['top1'], abs=1e-3) and report['pgd'][0]['steps'] == 2


class _DualBNTask(PGDTrainingTask):
    """A method that trains with timm split (auxiliary) BNs and strips them on export."""

    def export_model(self):
        from timm.layers import SplitBatchNorm2d

        def strip(module):
            for name, child in module.named_children():
                if isinstance(child, SplitBatchNorm2d):
                    bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                    bn.load_state_dict({k: v for k, v in child.state_dict().items() if not k.startswith('aux_bn')})
                    setattr(module, name, bn)
                else:
                    strip(child)
        strip(self.unwrapped_model)
        return self.unwrapped_model


def test_export_goes_through_the_method_hook(tmp_path):
    from timm.layers import convert_splitbn_model
    args = _train_args()
    model = convert_splitbn_model(_trained_like_model(args), 2).eval()
    x = sample_batch(DATA_CONFIG, seed=3)
    with torch.no_grad():
        expected = model(x)
    task = _DualBNTask(model, nn.CrossEntropyLoss(), attack=None, verbose=False)
    result = export_from_task(task, str(tmp_path / 'out'), DATA_CONFIG, architecture='test_resnet')
    assert not any('aux_bn' in k for k in result.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(result.model(x), expected, atol=1e-6)


def test_export_refuses_changed_outputs_and_leftover_parts(tmp_path):
    args = _train_args()

    class Perturbing(PGDTrainingTask):
        def export_model(self):
            plain = _trained_like_model(args)
            plain.load_state_dict(self.unwrapped_model.state_dict())
            plain.fc.bias.data += 1.0
            return plain

    class Leftover(PGDTrainingTask):
        def export_model(self):
            self.unwrapped_model.aux_generator = nn.Conv2d(3, 3, 1)
            return self.unwrapped_model

    with pytest.raises(ExportError, match='changes the outputs.*export_model'):
        export_from_task(Perturbing(_trained_like_model(args), nn.CrossEntropyLoss(), attack=None, verbose=False),
                         str(tmp_path / 'a'), DATA_CONFIG, architecture='test_resnet')
    with pytest.raises(ExportError, match='training-only keys.*aux_generator'):
        export_from_task(Leftover(_trained_like_model(args), nn.CrossEntropyLoss(), attack=None, verbose=False),
                         str(tmp_path / 'b'), DATA_CONFIG, architecture='test_resnet')
    assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def test_export_bad_checkpoints(checkpoint, tmp_path):
    path, model, args = checkpoint
    unknown = argparse.Namespace(**dict(vars(args), model='no_such_arch_v9'))
    torch.save({'state_dict': model.state_dict(), 'args': unknown}, tmp_path / 'unknown.pth.tar')
    with pytest.raises(ExportError, match="'no_such_arch_v9' is unknown to timm"):
        export_checkpoint(str(tmp_path / 'unknown.pth.tar'), str(tmp_path / 'o1'))
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'noargs.pth.tar')
    with pytest.raises(ExportError, match='no training arguments'):
        export_checkpoint(str(tmp_path / 'noargs.pth.tar'), str(tmp_path / 'o2'))
    os.makedirs(tmp_path / 'full')
    open(tmp_path / 'full' / 'x', 'w').close()
    with pytest.raises(ExportError, match='--overwrite'):
        export_checkpoint(path, str(tmp_path / 'full'))


def test_export_cli_bad_input_exits_cleanly(tmp_path, capsys):
    from timm_adv.hub.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(['export', str(tmp_path / 'missing.pth.tar'), '--out', str(tmp_path / 'o')])
    assert exit_info.value.code == 2 and 'no such file' in capsys.readouterr().err


# ---------------------------------------------------------------- publish

class _FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(('create_repo', kwargs))
        return 'https://huggingface.co/' + kwargs['repo_id']

    def create_branch(self, **kwargs):
        self.calls.append(('create_branch', kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(('upload_folder', kwargs))
        return argparse.Namespace(oid='abc123')


def test_publish_dry_run_and_mocked_upload(exported, tmp_path, monkeypatch):
    folder, _ = exported
    api = _FakeApi()
    dry = publish_folder(folder, REPO_ID, dry_run=True, api=api)
    assert dry['dry_run'] and 'model.safetensors' in dry['files'] and api.calls == []
    out = publish_folder(folder, REPO_ID, private=True, revision='v1', commit_message='robust weights', api=api)
    names = [c[0] for c in api.calls]
    assert names == ['create_repo', 'create_branch', 'upload_folder'] and out['commit'] == 'abc123'
    assert api.calls[0][1]['private'] is True and api.calls[2][1]['revision'] == 'v1'
    assert api.calls[2][1]['commit_message'] == 'robust weights' and api.calls[2][1]['folder_path'] == folder
    os.makedirs(tmp_path / 'partial')
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        publish_folder(str(tmp_path / 'partial'), REPO_ID, dry_run=True)
    monkeypatch.setattr('timm_adv.hub.publish._saved_token', lambda: None)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    with pytest.raises(RuntimeError, match='HF_TOKEN'):
        publish_folder(folder, REPO_ID)


# ---------------------------------------------------------------- hub configs and model cards

def test_hub_configs_are_complete():
    paths = sorted(glob.glob(os.path.join(REPO, 'hub_configs', '*.yaml')))
    configs = {os.path.basename(p): load_hub_config(p, check_method=False) for p in paths}
    configs = {k: c for k, c in configs.items() if c['status'] != 'imported'}  # test_zoo checks those
    assert configs['resnet10t_pgd_mnist.yaml']['status'] == 'trained'
    assert {c['method'] for c in configs.values()} >= {'pgd', 'advprop', 'dat', 'fgsm-sdi'}
    assert sum(c['status'] == 'not-yet-trained' for c in configs.values()) >= 4
    from timm_adv.tasks import list_methods
    assert {c['method'] for c in configs.values()} <= set(list_methods())
    for name in configs:  # every config passes the full check
        load_hub_config(os.path.join(REPO, 'hub_configs', name))
    demo = load_hub_config(os.path.join(REPO, 'hub_configs', 'resnet10t_pgd_mnist.yaml'))
    argv = train_command(demo, '/tmp/out', 'exp')
    args, _ = train.parse_args(argv[1:])
    assert args.model == 'resnet10t' and args.adv_method == 'pgd' and args.adv_eps == 0.1 and args.epochs == 1
    from timm_adv.cli import validate
    vargs = validate.parse_args(validate_command(demo, 'local-dir:/x', '/tmp/r')[1:])
    assert vargs.autoattack == 'standard' and vargs.corruptions_generated and vargs.eps == [0.05, 0.1, 0.2]


def test_hub_config_errors(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('repo_id: a/b\nstatus: maybe\narchitecture: resnet10t\nmethod: pgd\ndataset: x\nlicense: mit\n'
                    'evaluation: {}\n')
    with pytest.raises(ValueError, match='status must be one of'):
        load_hub_config(str(path))
    path.write_text('repo_id: a/b\n')
    with pytest.raises(ValueError, match='lacks status'):
        load_hub_config(str(path))


@pytest.mark.parametrize('name', list_methods())
def test_model_card_cites_the_paper_its_task_class_declares(name):
    cls = get_method(name)
    assert method_reference(name) == dict(paper=cls.paper, url=cls.url, citation=cls.citation)
    if name != 'none':  # every adversarial method names its paper, address and BibTeX entry
        assert cls.url.startswith('https://') and cls.citation.startswith('@') and cls.paper
    assert method_reference('gone-method')['paper'] == 'gone-method (see the timm-adv documentation)'


def test_model_card_shows_measured_table_and_plots(exported, tmp_path):
    folder, _ = exported
    report = dict(model='m', dataset='bundled/mnist', clean=dict(top1=97.5, top5=99.9, samples=1000),
                  attack_subset_clean=dict(top1=98.0, samples=500),  # validate.py --attack-samples adds it
                  pgd=[dict(attack='pgd', eps=e, norm='linf', steps=20, step_size=e / 8, restarts=1, samples=500,
                            top1=a) for e, a in ((0.05, 90.0), (0.1, 71.25))])
    text = render_model_card(folder, REPO_ID, report=report, train_command='python train.py --model test_resnet',
                             plots={'accuracy_vs_eps': 'accuracy_vs_eps.png'})
    assert '| PGD-20 | linf eps=0.1, step=0.0125, restarts=1 | 500 | 71.25 |' in text
    assert '![accuracy vs eps](accuracy_vs_eps.png)' in text and 'python train.py --model test_resnet' in text
    assert 'Madry' in text and '@inproceedings{madry2018towards' in text and 'library_name: timm' in text
    written = save_report(report, str(tmp_path))
    assert open(written['accuracy_vs_eps'], 'rb').read(4) == b'\x89PNG'


# ---------------------------------------------------------------- model cards people trust

def test_card_shows_the_method_settings_the_run_validation_and_a_fresh_evaluation(image_folder, tmp_path, capsys):
    import csv
    from timm_adv.cli import train
    from timm_adv.hub.__main__ import main as hub_main
    train.main(['--data-dir', str(image_folder), '--model', 'test_resnet', '--num-classes', '10', '--img-size', '32',
                '--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-steps', '1', '-b', '8', '--epochs', '1',
                '--warmup-epochs', '0', '--workers', '0', '--no-aug', '--adv-val-samples', '8', '--adv-val-steps', '2',
                '--output', str(tmp_path), '--experiment', 'run'])
    ckpt = str(tmp_path / 'run' / 'last.pth.tar')
    with pytest.raises(SystemExit):  # evaluation settings without --evaluate
        hub_main(['export', ckpt, '--out', str(tmp_path / 'x'), '--eval-samples', '4'])
    assert '--eval-samples only apply with --evaluate' in capsys.readouterr().err
    out = tmp_path / 'export'
    hub_main(['export', ckpt, '--out', str(out), '--evaluate', '--eval-samples', '4', '--eval-steps', '1',
              '--eval-eps', '0.05', '0.1'])
    card = (out / 'README.md').read_text()
    # only the PGD run's own settings: no other method's options
    assert '| adv_eps | 0.1 |' in card and '| adv_steps | 1 |' in card
    assert not any(k in card for k in ('adv_advbn', 'adv_dat', 'adv_contrastive', 'adv_knn', 'adv_sdi', 'adv_ssat'))
    # the run's last validation with its protocol, as summary.csv has it
    with open(tmp_path / 'run' / 'summary.csv') as f:
        row = list(csv.DictReader(f))[-1]
    assert 'Not evaluated yet' not in card and '### Validation during training' in card
    assert f"| Clean | {image_folder.name}, split 'validation' | 20 | {float(row['eval_top1']):.2f} |" in card
    assert (f"| PGD-2 | linf eps=0.1, step=0.125, random start, evenly spaced subset | 8 | "
            f"{float(row['eval_pgd_top1']):.2f} |") in card
    # --evaluate: validate.py's figures on the export, its command and the plot
    report = json.load(open(out / 'robustness.json'))
    assert [p['eps'] for p in report['pgd']] == [0.05, 0.1] and report['pgd'][0]['samples'] == 4
    assert '### Evaluation of the exported weights' in card and '--model local-dir:. --pretrained --data-dir DATA_DIR' in card
    assert f'| PGD-1 | linf eps=0.1, step=0.1, restarts=1 | 4 | {report["pgd"][1]["top1"]:.2f} |' in card
    assert '![accuracy vs eps](accuracy_vs_eps.png)' in card and (out / 'accuracy_vs_eps.png').read_bytes()[:4] == b'\x89PNG'
    command = next(line for line in card.splitlines() if line.startswith('python validate.py'))
    assert str(tmp_path) not in command and str(image_folder) not in command


def test_demo_plot_merges_the_runs_results_files(tmp_path):
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    import plot_demo
    row = dict(model='resnet10t', top1=98.0, attack='pgd', steps=20)
    for name, rows in (('plain', [dict(row, eps='0.05 0.1', **{'pgd20_top1@0.05': 40.0, 'pgd20_top1@0.1': 1.0})]),
                       ('pgd-at', [dict(row, eps='0.1', pgd20_top1=94.0)])):
        (tmp_path / f'{name}-validate.json').write_text(json.dumps(rows))
    (tmp_path / 'pgd-at-validate-eps0.15.json').write_text(json.dumps([dict(row, eps='0.15', pgd20_top1=80.0)]))
    assert plot_demo.demo_curves(str(tmp_path)) == {'plain': [(0.0, 98.0), (0.05, 40.0), (0.1, 1.0)],
                                                    'pgd-at': [(0.0, 98.0), (0.1, 94.0), (0.15, 80.0)]}
    path = plot_demo.main([str(tmp_path), '--out', str(tmp_path / 'img' / 'demo.png')])
    assert open(path, 'rb').read(4) == b'\x89PNG'

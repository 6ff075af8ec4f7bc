"""No flag silently ignored: typed-flag detection and the per-method / per-evaluation checks (parse only)."""
import argparse

import pytest
import yaml

from timm_adv.cli import train
from timm_adv.cli import validate
from timm_adv.tasks import AdversarialTask, check_adv_args, get_method, list_methods, method_args, registry
from timm_adv.utils import explicit_args


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--flag', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--adv-clean-weight', type=float, default=0.0)
    return p


def test_explicit_args_sees_typed_flags_even_at_their_default():
    p = _parser()
    # 128 is the default: typed, it still counts; the alias, an abbreviation and --no- forms resolve
    assert explicit_args(p, ['-b', '128']) == {'batch_size': '--batch-size'}
    assert explicit_args(p, ['--adv-clean', '0']) == {'adv_clean_weight': '--adv-clean-weight'}
    assert explicit_args(p, ['--no-flag']) == {'flag': '--flag/--no-flag'}
    assert explicit_args(p, []) == {}
    # config keys count when they differ from the built-in default (an args.yaml lists every flag)
    assert explicit_args(p, [], config={'batch_size': 128, 'lr': 0.5}, config_name='-c a.yaml') == {
        'lr': '--lr (from -c a.yaml)'}
    # the parser's defaults are left as they were
    assert p.parse_args([]).batch_size == 128 and p.parse_args([]).flag is True


def _train_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train.parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize('argv,message', [
    (['--adv-eps', '0.1'], '--adv-eps does nothing with --adv-method none; it applies to pgd, advprop, fgsm-rs, '
                           'fgsm-sdi, dat, ssat (the robust validation radius is --adv-val-eps)'),
    (['--adv-steps', '10'], '--adv-steps does nothing with --adv-method none'),  # typed at a value a method defaults to
    (['--adv-method', 'none', '--adv-bn-mode', 'eval'], '--adv-bn-mode does nothing with --adv-method none'),
    (['--adv-method', 'advprop', '--adv-clean-weight', '0.5'],
     '--adv-clean-weight does nothing with --adv-method advprop; it applies to pgd, fgsm-rs'),
    (['--adv-method', 'fgsm-sdi', '--adv-clean-weight', '0'], '--adv-clean-weight does nothing with --adv-method fgsm-sdi'),
    (['--adv-method', 'fgsm-sdi', '--adv-targeted', 'random'], '--adv-targeted does nothing with --adv-method fgsm-sdi'),
    (['--adv-method', 'fgsm-sdi', '--no-adv-random-start'],
     '--adv-random-start/--no-adv-random-start does nothing with --adv-method fgsm-sdi'),
    (['--adv-method', 'pgd', '--adv-sdi-every', '20'], '--adv-sdi-every does nothing with --adv-method pgd; it applies '
                                                       'to fgsm-sdi'),
    (['--adv-method', 'pgd', '--no-adv-sdi-clamp'], '--adv-sdi-clamp/--no-adv-sdi-clamp does nothing with --adv-method pgd'),
    (['--adv-method', 'fgsm-sdi', '--adv-advprop-adv-weight', '1'], '--adv-advprop-adv-weight does nothing with '
                                                                     '--adv-method fgsm-sdi; it applies to advprop'),
    (['--adv-method', 'pgd', '--adv-val-samples', '0', '--eval-metric', 'pgd_top1'],
     '--eval-metric pgd_top1 needs the per-epoch robust validation'),
    (['--adv-val-samples', '0', '--adv-val-steps', '5'], '--adv-val-steps does nothing with --adv-val-samples 0'),
    (['--adv-method', 'pgd', '--adv-co-action', 'stop'], '--adv-co-action does nothing: the catastrophic-overfitting '
                                                         'guard is off for --adv-method pgd'),
    (['--adv-method', 'fgsm-sdi', '--adv-val-samples', '0'], 'guard watches the robust validation subset'),
])
def test_train_rejects_flags_the_method_ignores(capsys, argv, message):
    assert message in _train_error(capsys, *argv)


@pytest.mark.parametrize('argv', [
    ['--adv-method', 'pgd', '--adv-eps', '0.1', '--adv-clean-weight', '0.5', '--adv-targeted', 'random'],
    ['--adv-method', 'fgsm-rs', '--adv-clean-weight', '0.2', '--adv-step-size', '0.1', '--adv-co-drop', '5'],
    ['--adv-method', 'fgsm-sdi', '--adv-eps', '0.1', '--adv-step-size', '0.1', '--adv-sdi-every', '5', '--adv-co-action',
     'stop'],
    ['--adv-method', 'advprop', '--adv-steps', '2', '--adv-advprop-clean-weight', '0.5'],
    ['--adv-method', 'pgd', '--adv-co-guard', '--adv-co-drop', '5'],
    ['--adv-method', 'none', '--adv-val-eps', '0.1', '--adv-val-steps', '3'],
])
def test_train_accepts_flags_the_method_reads(argv):
    train.parse_args(argv)


def test_config_file_counts_changed_keys_only(tmp_path, capsys):
    args, _ = train.parse_args(['--adv-method', 'pgd'])
    cfg = dict(vars(args))  # every key, as an args.yaml holds them
    cfg['adv_method'] = 'advprop'
    (tmp_path / 'same.yaml').write_text(yaml.safe_dump(cfg))
    train.parse_args(['-c', str(tmp_path / 'same.yaml')])  # method defaults of other methods: not "set"
    cfg['adv_clean_weight'] = 0.3
    (tmp_path / 'changed.yaml').write_text(yaml.safe_dump(cfg))
    err = _train_error(capsys, '-c', str(tmp_path / 'changed.yaml'))
    assert f'--adv-clean-weight (from -c {tmp_path / "changed.yaml"}) does nothing with --adv-method advprop' in err


def test_new_methods_get_the_check_for_free(monkeypatch):
    class DummyTask(AdversarialTask):
        uses_args = ('adv_eps',)

        @classmethod
        def add_args(cls, group):
            group.add_argument('--adv-dummy-scale', type=float, default=1.0)

    monkeypatch.setitem(registry._METHODS, 'dummy-test', DummyTask)
    assert method_args('dummy-test') == {'adv_dummy_scale'}
    args = argparse.Namespace(adv_method='pgd', adv_val_samples=10)
    with pytest.raises(ValueError, match='--adv-dummy-scale does nothing with --adv-method pgd; it applies to dummy-test'):
        check_adv_args(args, {'adv_dummy_scale': '--adv-dummy-scale'})
    args.adv_method = 'dummy-test'
    check_adv_args(args, {'adv_dummy_scale': '--adv-dummy-scale', 'adv_eps': '--adv-eps'})
    with pytest.raises(ValueError, match='--adv-steps does nothing with --adv-method dummy-test'):
        check_adv_args(args, {'adv_steps': '--adv-steps'})


def test_pgd_top1_selection_warns_about_the_leak(caplog):
    train.parse_args(['--adv-method', 'pgd', '--eval-metric', 'pgd_top1'])
    assert 'test-set selection leak' in caplog.text and '--val-split' in caplog.text


@pytest.mark.parametrize('argv,message', [
    (['--attack', 'fgsm', '--restarts', '2'], '--restarts does nothing without --attack pgd (got --attack fgsm)'),
    (['--attack', 'fgsm', '--step-size', '0.01'], '--step-size does nothing without --attack pgd (got --attack fgsm)'),
    (['--attack', 'fgsm', '--steps', '20'], '--steps does nothing without --attack pgd'),
    (['--attack-samples', '10'], '--attack-samples does nothing without --attack fgsm|pgd'),
    (['--eps', '0.1'], '--eps does nothing without --attack fgsm|pgd (or --autoattack without --aa-eps)'),
    (['--aa-samples', '10'], '--aa-samples does nothing without --autoattack'),
    (['--autoattack', 'standard', '--aa-iters', '5'], '--aa-iters does nothing without --autoattack custom'),
    (['--autoattack', 'rand', '--aa-attacks', 'apgd-ce'], '--aa-attacks does nothing without --autoattack custom'),
    (['--corruption-protocol', 'model'], '--corruption-protocol does nothing without --corruption-dir'),
    (['--corruptions-generated', '--corruption-protocol', 'model'], '--corruption-protocol does nothing'),
    (['--severities', '1'], '--severities does nothing without --corruption-dir or --corruptions-generated'),
    (['--no-plots'], '--no-plots does nothing without --report-dir'),
])
def test_validate_rejects_ignored_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        validate.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_validate_accepts_flags_in_use():
    args = validate.parse_args(['--autoattack', 'standard', '--eps', '0.1', '--aa-subset', 'first', '--norm', 'linf'])
    assert args.aa_eps == pytest.approx(0.1)  # --eps feeds AutoAttack without --aa-eps
    validate.parse_args(['--attack', 'pgd', '--steps', '5', '--restarts', '2', '--step-size', '0.01'])
    validate.parse_args(['--corruption-dir', '/x', '--corruption-protocol', 'model', '--severities', '1'])


@pytest.mark.parametrize('name', list_methods())
def test_a_method_writes_its_flag_defaults_once(name):
    method = get_method(name)
    scratch = argparse.ArgumentParser(add_help=False)
    method.add_args(scratch.add_argument_group())
    created = {a.dest: a.default for a in scratch._actions}
    # every default its flags declare comes from the table, and the table names only flags the method reads
    assert {dest: value for dest, value in created.items() if value is not None} == \
        {dest: value for dest, value in method.flag_defaults.items() if dest in created and value is not None}
    assert set(method.flag_defaults) <= set(created) | set(method.uses_args)
    assert {d: method.setting(argparse.Namespace(), d) for d in method.flag_defaults} == method.flag_defaults

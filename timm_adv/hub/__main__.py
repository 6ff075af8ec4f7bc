"""Command line: ``python -m timm_adv.hub {export,preview,import,zoo,publish,cache,compare,pipeline} ...``.

    python -m timm_adv.hub export output/train/run/last.pth.tar --out hub/run --repo-id me/resnet10t.pgd_mnist
    python -m timm_adv.hub preview output/train/dat_run/last.pth.tar --out dat_preview.png
    python -m timm_adv.hub import robustbench:Salman2020Do_50_2 --weights Salman2020Do_50_2.pt --out hub/wrn50_2
    python -m timm_adv.hub zoo --source easyrobust
    python -m timm_adv.hub publish hub/run --repo-id me/resnet10t.pgd_mnist --dry-run
    python -m timm_adv.hub cache hub/run --repo-id me/resnet10t.pgd_mnist --cache-dir /tmp/hf/hub
    python -m timm_adv.hub compare hf-hub:me/resnet10t.pgd_mnist local-dir:hub/run
    python -m timm_adv.hub pipeline hub_configs/resnet10t_pgd_mnist.yaml --out /tmp/hub-demo
"""
import argparse
import json
import logging
import sys

from timm import utils

_logger = logging.getLogger('timm_adv.hub')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_adv.hub', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('export', help='training checkpoint -> verified plain-timm Hub folder with model card')
    p.add_argument('checkpoint', help='timm-adv training checkpoint (last.pth.tar, model_best.pth.tar, ...)')
    p.add_argument('--out', required=True, help='folder to write')
    p.add_argument('--repo-id', default=None, help='org/name shown in the model card (default: timm-adv/<run name>)')
    p.add_argument('--use-ema', action='store_true', help='export the EMA weights')
    p.add_argument('--license', default='apache-2.0', help='licence identifier (default: apache-2.0)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')
    p.add_argument('--knn-bank', action='store_true',
                   help='contrastive / ssat feature models: also write knn_bank.safetensors (the training split '
                        'embedded with the exported weights)')
    p.add_argument('--evaluate', action='store_true',
                   help="evaluate the export with validate.py on the run's validation split (clean, PGD at --eval-eps, "
                        'optionally AutoAttack) and put the figures, their command and the accuracy-vs-eps plot in the card')
    p.add_argument('--eval-eps', nargs='+', default=None, metavar='EPS',
                   help="with --evaluate: PGD radii (default: half, one and one and a half times the run's "
                        'validation eps)')
    p.add_argument('--eval-samples', type=int, default=1000, metavar='N',
                   help='with --evaluate: images attacked at each eps (default: 1000)')
    p.add_argument('--eval-steps', type=int, default=20, metavar='K', help='with --evaluate: PGD steps (default: 20)')
    p.add_argument('--eval-autoattack', type=int, default=0, metavar='N',
                   help='with --evaluate: also run AutoAttack (standard, largest --eval-eps) on N images (default: 0, '
                        'off; hours on a CPU for a few hundred)')

    p = sub.add_parser('preview', help="a DAT run's training examples: clean / VQGAN reconstruction / DAT example grid")
    p.add_argument('checkpoint', help='timm-adv training checkpoint of an --adv-method dat run')
    p.add_argument('--out', default='dat_preview.png', help='PNG to write (default: dat_preview.png)')
    p.add_argument('--num-images', type=int, default=6, metavar='N',
                   help='evenly spaced validation images, one column each (default: 6)')

    p = sub.add_parser('import', help='published robust model (RobustBench, EasyRobust) -> verified plain-timm Hub '
                                      'folder with model card')
    p.add_argument('model', metavar='SOURCE:NAME', help='robustbench:<name> or easyrobust:<name> (list: zoo)')
    p.add_argument('--weights', default=None, metavar='FILE',
                   help="the file the source's loader reads for this entry (default: download it through the source)")
    p.add_argument('--out', required=True, help='folder to write')
    p.add_argument('--repo-id', default=None, help='org/name shown in the model card (default: timm-adv/<hub name>)')
    p.add_argument('--cache-dir', default=None, help='download folder (without --weights)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')

    p = sub.add_parser('zoo', help='list the importable entries and the refused ones (with the reason)')
    p.add_argument('--source', choices=('robustbench', 'easyrobust'), default=None, help='only this source')

    p = sub.add_parser('publish', help='upload an export folder to the Hub (needs a token) or check it (--dry-run)')
    p.add_argument('folder')
    p.add_argument('--repo-id', required=True, help='org/name')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to upload to (default: main)')
    p.add_argument('--commit-message', default='Upload timm-adv robust model')
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the saved login)')
    p.add_argument('--dry-run', action='store_true', help='only check the folder and list what would be uploaded')

    p = sub.add_parser('cache', help='place an export folder in a Hub cache for offline hf-hub: loading')
    p.add_argument('folder')
    p.add_argument('--repo-id', required=True, help='org/name to load it as')
    p.add_argument('--cache-dir', default=None, help='Hub cache root (default: $HF_HUB_CACHE or $HF_HOME/hub)')
    p.add_argument('--revision', default='main')

    p = sub.add_parser('compare', help='max |output difference| of two models on a fixed sample batch')
    p.add_argument('model_a', help='e.g. hf-hub:org/name')
    p.add_argument('model_b', help='e.g. local-dir:/path')
    p.add_argument('--tolerance', type=float, default=1e-5, help='fail above this difference (default: 1e-5)')

    p = sub.add_parser('pipeline', help='hub config -> train -> export -> evaluate -> model card')
    p.add_argument('config', help='hub_configs/*.yaml')
    p.add_argument('--out', required=True, help='working folder')
    p.add_argument('--data-dir', default=None, help='dataset location (overrides the config)')
    p.add_argument('--checkpoint', default=None,
                   help="skip training: export and evaluate this checkpoint (status: imported: the weights file the "
                        "source's loader reads; default: download it)")
    p.add_argument('--publish', action='store_true', help='upload at the end (with --dry-run: only check)')
    p.add_argument('--dry-run', action='store_true', help='with --publish: build and check, do not upload')
    p.add_argument('--overwrite', action='store_true', help='replace an existing export folder')
    return parser


def _check_eval_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.command != 'export' or args.evaluate:
        return
    given = [flag for flag, value, default in (('--eval-eps', args.eval_eps, None), ('--eval-samples', args.eval_samples, 1000),
                                               ('--eval-steps', args.eval_steps, 20),
                                               ('--eval-autoattack', args.eval_autoattack, 0)) if value != default]
    if given:
        parser.error(f'{", ".join(given)} only apply with --evaluate; add --evaluate or drop them.')


def _eval_eps(args, exported_meta: dict) -> list:
    """--eval-eps, or 0.5 / 1 / 1.5 times the robust validation eps of the run."""
    from timm_adv.attacks import parse_eps
    if args.eval_eps:
        return [parse_eps(e, '--eval-eps') for e in args.eval_eps]
    robust = ((exported_meta.get('validation') or {}).get('protocol') or {}).get('robust') or {}
    eps = robust.get('eps') or exported_meta.get('method_args', {}).get('adv_eps') or 8 / 255
    return [round(eps * f, 6) for f in (0.5, 1.0, 1.5)]


def _export(args) -> dict:
    import os
    import shlex
    from .export import METADATA_KEY, export_checkpoint
    from .model_card import write_model_card
    from .pipeline import evaluate_export
    exported, train_args = export_checkpoint(args.checkpoint, args.out, use_ema=args.use_ema, license=args.license,
                                             overwrite=args.overwrite, knn_bank=args.knn_bank)
    run_name = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) or train_args.model
    repo_id = args.repo_id or f'timm-adv/{run_name}'
    card_kwargs = {}
    if args.evaluate:
        with open(os.path.join(args.out, 'config.json')) as f:
            meta = json.load(f).get(METADATA_KEY, {})
        evaluation = evaluate_export(args.out, train_args, _eval_eps(args, meta), samples=args.eval_samples,
                                     steps=args.eval_steps, autoattack_samples=args.eval_autoattack)
        # shown as run inside the export folder: the card names no path of this machine
        paths = {args.out: '.', f'local-dir:{args.out}': 'local-dir:.', getattr(train_args, 'data_dir', None): 'DATA_DIR'}
        shown = [paths.get(a, a) for a in evaluation['command']]
        card_kwargs = dict(report=evaluation['report'], plots=evaluation['plots'],
                           validate_command='python ' + ' '.join(shlex.quote(a) for a in shown))
    card = write_model_card(args.out, repo_id, **card_kwargs)
    return dict(folder=args.out, architecture=exported.architecture, max_abs_diff=exported.max_abs_diff,
                model_card=card)


def _preview(args) -> dict:
    import os
    import tempfile
    from timm_adv.tasks import AdversarialTask
    from .export import ExportError, task_from_checkpoint, validation_batch
    if args.num_images < 1:
        raise ValueError(f'--num-images must be >= 1, got {args.num_images}.')
    task, train_args, data_config = task_from_checkpoint(args.checkpoint)
    if type(task).card_images is AdversarialTask.card_images:
        raise ExportError(f'{args.checkpoint!r} is an --adv-method {train_args.adv_method} run; the preview shows the '
                          f'training examples of a dat run.')
    x, y = validation_batch(train_args, data_config, args.num_images)
    with tempfile.TemporaryDirectory() as folder:
        (caption, name), = task.card_images(x, y, folder).items()
        os.replace(os.path.join(folder, name), args.out)
    return dict(preview=args.out, images=int(x.shape[0]), rows=caption)


def _compare(args) -> dict:
    import timm
    from timm.data import resolve_data_config
    from .export import compare_outputs, sample_batch
    a = timm.create_model(args.model_a, pretrained=True)
    b = timm.create_model(args.model_b, pretrained=True)
    sample = sample_batch(resolve_data_config({}, model=a))
    diff = compare_outputs(a, b, sample)
    if not diff <= args.tolerance:
        raise ValueError(f'{args.model_a} and {args.model_b} differ: max |output diff| {diff:.3g} > {args.tolerance}.')
    return dict(max_abs_diff=diff, samples=int(sample.shape[0]), identical=diff == 0.0)


def main(argv=None) -> dict:
    utils.setup_default_logging()
    parser = _parser()
    args = parser.parse_args(argv)
    _check_eval_flags(parser, args)
    from . import cache, pipeline, publish
    try:
        if args.command == 'export':
            result = _export(args)
        elif args.command == 'preview':
            result = _preview(args)
        elif args.command == 'import':
            from .zoo_import import import_zoo_model
            result = import_zoo_model(args.model, args.out, weights=args.weights, repo_id=args.repo_id,
                                      overwrite=args.overwrite, cache_dir=args.cache_dir)
        elif args.command == 'zoo':
            from .zoo import zoo_listing
            result = zoo_listing(args.source)
        elif args.command == 'publish':
            result = publish.publish_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                                            commit_message=args.commit_message, token=args.token, dry_run=args.dry_run)
        elif args.command == 'cache':
            result = dict(snapshot=cache.populate_hf_cache(args.folder, args.repo_id, args.cache_dir, args.revision))
        elif args.command == 'compare':
            result = _compare(args)
        else:
            result = pipeline.run_pipeline(args.config, args.out, data_dir=args.data_dir, checkpoint=args.checkpoint,
                                           publish=args.publish, dry_run=args.dry_run, overwrite=args.overwrite)
            result = {k: v for k, v in result.items() if k != 'report'}
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f'python -m timm_adv.hub {args.command}: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == '__main__':
    main()

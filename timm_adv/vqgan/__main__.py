"""Command line: ``python -m timm_adv.vqgan {fit,convert} ...``.

    python -m timm_adv.vqgan fit        # bundled digits, 32 px, f=4 -> output/vqgan/bundled_mnist
    python -m timm_adv.vqgan fit --data-dir /data/cifar --dataset torch/cifar10 --out output/vqgan/cifar10
    python -m timm_adv.vqgan fit --out output/vqgan/bundled_mnist --resume --steps 2000
    python -m timm_adv.vqgan convert vq-f8/model.ckpt --config vq-f8      # -> the vq-f8 preset's cache folder
    python -m timm_adv.vqgan convert vqgan_openimages_f8_16384.ckpt --config vq-f8 --out vq-f8-safetensors
"""
import argparse
import json
import logging
import sys

from .fit import add_fit_args, fit_vqgan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m timm_adv.vqgan', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    add_fit_args(sub.add_parser('fit', help='fit a VQGAN to a dataset; writes a folder create_vqgan loads'))
    p = sub.add_parser('convert', help='any VQGAN create_vqgan reads -> config.yaml + model.safetensors')
    p.add_argument('source', help='preset, file, folder, local-dir: or hf-hub: name')
    p.add_argument('--out', default=None,
                   help='folder to write (default with a preset --config: the preset\'s cache folder, '
                        '$TIMM_ADV_HOME/vqgan/<preset>, where create_vqgan(<preset>) and --adv-dat-vqgan <preset> read)')
    p.add_argument('--config', default=None, help='config yaml or preset for weights without one beside them')
    p.add_argument('--unsafe-pickle', action='store_true',
                   help='allow full unpickling of a trusted Lightning .ckpt that weights_only loading refuses')
    return parser


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = _parser().parse_args(argv)
    try:
        if args.command == 'fit':
            result = fit_vqgan(args)
        else:
            from .config import VQGAN_PRESETS
            from .factory import create_vqgan, preset_folder, save_vqgan
            out = args.out or (preset_folder(args.config) if args.config in VQGAN_PRESETS else None)
            if out is None:
                raise ValueError('--out is needed unless --config names a preset (then the preset\'s cache folder).')
            vq = create_vqgan(args.source, config=args.config, unsafe_pickle=args.unsafe_pickle)
            save_vqgan(vq, out, metadata=dict(converted_from=args.source, source_sha256=vq.weights_sha256))
            result = dict(out=out, **vq.describe())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'python -m timm_adv.vqgan {args.command}: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == '__main__':
    main()

"""Fit a small VQGAN to a dataset that train.py reads: ``python -m timm_adv.vqgan fit``.

An ImageNet f8/f16 VQGAN turns a 32 px image into a 4x4 or 2x2 code grid, useless for DAT on small
images; this fits one to the domain with taming's modules. Loss per step (taming's VQ objective):

    |x - x_rec|  (L1, or squared with --rec-loss l2; images in [-1, 1])
    + codebook_weight * (|sg[z] - e|^2 + beta |z - sg[e]|^2)      (VectorQuantizer2, legacy=False)
    + perceptual_weight * LPIPS(x, x_rec)                          (off by default: needs downloaded weights)
    + disc_weight * lambda * hinge generator loss of a patch-GAN   (off by default; after --disc-start)

lambda is taming's adaptive weight (ratio of the gradient norms at the decoder's last layer).

Dead codes (entries no latent picks, the usual failure of VQ training): every ``--dead-code-every``
steps each entry chosen by no training latent since the previous check is re-initialised to an
encoder latent drawn at random from the current batch, and its Adam moments are reset. Step 0 does
it for the whole codebook, so the codebook starts as a sample of data latents.

The output folder holds ``config.yaml`` + ``model.safetensors`` (``create_vqgan(folder)`` loads them;
the yaml's ``timm_adv:`` section records the validation PSNR and code usage of exactly these weights),
``last.pth`` (training state for ``--resume``), ``metrics.json`` and ``reconstructions.png`` (validation
images, originals above reconstructions). Every file is written atomically.
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.data
from torchvision import transforms
from torchvision.utils import save_image

from timm_adv.data import DEFAULT_DATASET, create_dataset, spread_subset
from timm_adv.utils.args import bounded_type
from timm_adv.utils.files import atomic_write

from .config import VQGANConfig
from .discretizer import VQGANDiscretizer
from .factory import CONFIG_FILE, WEIGHTS_FILE, save_vqgan
from .model import VQModel

__all__ = ['add_fit_args', 'fit_vqgan', 'evaluate_vqgan', 'SquareImages']

_logger = logging.getLogger(__name__)

STATE_FILE = 'last.pth'
# flags a resumed run may change; every other one must equal the interrupted run's
_RESUME_MAY_CHANGE = ('steps', 'eval_every', 'workers', 'device', 'resume', 'out', 'val_samples', 'grid_images')


def add_fit_args(parser: argparse.ArgumentParser) -> None:
    """The ``fit`` flags (data flags named as in train.py)."""
    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default=None, help=f'train.py dataset name (default without --data-dir: '
                                                   f'{DEFAULT_DATASET})')
    g.add_argument('--data-dir', default=None, help='dataset location (image folders, torch/ datasets, ...)')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation')
    g.add_argument('--img-size', type=bounded_type('--img-size', int, 8), default=32,
                   help='square size images are resized and centre-cropped to (default: 32)')
    g.add_argument('-b', '--batch-size', type=bounded_type('--batch-size', int, 1), default=16)
    g.add_argument('-j', '--workers', type=bounded_type('--workers', int, 0), default=0)
    g.add_argument('--val-samples', type=bounded_type('--val-samples', int, 1), default=1000,
                   help='evenly spaced validation images for PSNR and code usage (default: 1000)')
    g = parser.add_argument_group('architecture (taming ddconfig)')
    g.add_argument('--n-embed', type=bounded_type('--n-embed', int, 2), default=256, help='codebook entries')
    g.add_argument('--embed-dim', type=bounded_type('--embed-dim', int, 1), default=4, help='codebook vector size')
    g.add_argument('--z-channels', type=bounded_type('--z-channels', int, 1), default=4)
    g.add_argument('--ch', type=bounded_type('--ch', int, 32), default=32, help='base width (a multiple of 32)')
    g.add_argument('--ch-mult', type=bounded_type('--ch-mult', int, 1), nargs='+', default=[1, 1, 1],
                   help='width multiplier per level; downsampling factor 2 ** (levels - 1) (default: 1 1 1, f=4)')
    g.add_argument('--num-res-blocks', type=bounded_type('--num-res-blocks', int, 1), default=1)
    g.add_argument('--attn-resolutions', type=bounded_type('--attn-resolutions', int, 1), nargs='*', default=[],
                   help='feature sizes with self-attention besides the middle block (default: none)')
    g = parser.add_argument_group('optimisation')
    g.add_argument('--steps', type=bounded_type('--steps', int, 1), default=800)
    g.add_argument('--lr', type=bounded_type('--lr', float, 1e-12), default=1e-3, help='Adam, betas (0.5, 0.9)')
    g.add_argument('--rec-loss', choices=('l1', 'l2'), default='l2',
                   help='l2 (default, VQ-VAE; what PSNR measures) or l1 (taming)')
    g.add_argument('--beta', type=bounded_type('--beta', float, 0.0), default=0.25, help='commitment weight')
    g.add_argument('--codebook-weight', type=bounded_type('--codebook-weight', float, 0.0), default=1.0)
    g.add_argument('--dead-code-every', type=bounded_type('--dead-code-every', int, 0), default=50,
                   help='re-initialise unused codes every N steps (0: never)')
    g.add_argument('--perceptual-weight', type=bounded_type('--perceptual-weight', float, 0.0), default=0.0,
                   help='LPIPS weight (needs the VGG16 and vgg_lpips weights in the local caches)')
    g.add_argument('--disc-weight', type=bounded_type('--disc-weight', float, 0.0), default=0.0,
                   help='patch-GAN weight (taming NLayerDiscriminator, hinge loss, adaptive weight)')
    g.add_argument('--disc-start', type=bounded_type('--disc-start', int, 0), default=None,
                   help='step the GAN loss starts at (default: half of --steps); needs --disc-weight')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default='cpu')
    g = parser.add_argument_group('output')
    g.add_argument('--out', default='output/vqgan/bundled_mnist', help='folder (default: output/vqgan/bundled_mnist)')
    g.add_argument('--resume', action='store_true', help='continue the run in --out from its last.pth')
    g.add_argument('--eval-every', type=bounded_type('--eval-every', int, 1), default=200,
                   help='validate and save every N steps (and at the end)')
    g.add_argument('--grid-images', type=bounded_type('--grid-images', int, 1), default=16)


def _rgb(img):
    return img.convert('RGB')


class SquareImages(torch.utils.data.Dataset):
    """The images of a PIL dataset (labels dropped) as RGB [0, 1] tensors, resized and centre-cropped to a square.

    The wrapped dataset must return PIL images (its own ``transform`` set to None).

    Example:
        >>> val = BundledMnist('validation'); images = SquareImages(val, 32); images[0].shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, dataset, img_size: int):
        self.dataset = dataset
        self.transform = transforms.Compose([
            _rgb, transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(img_size), transforms.ToTensor()])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(self.dataset[i][0])


def _datasets(args):
    name = args.dataset if args.dataset is not None else ('' if args.data_dir else DEFAULT_DATASET)
    train = create_dataset(name, root=args.data_dir, split=args.train_split, is_training=True)
    val = create_dataset(name, root=args.data_dir, split=args.val_split)
    for ds in (train, val):
        ds.transform = None
    return SquareImages(train, args.img_size), SquareImages(spread_subset(val, args.val_samples), args.img_size)


def _config(args) -> VQGANConfig:
    ddconfig = dict(double_z=False, z_channels=args.z_channels, resolution=args.img_size, in_channels=3, out_ch=3,
                    ch=args.ch, ch_mult=list(args.ch_mult), num_res_blocks=args.num_res_blocks,
                    attn_resolutions=list(args.attn_resolutions), dropout=0.0)
    try:
        return VQGANConfig(embed_dim=args.embed_dim, n_embed=args.n_embed, ddconfig=ddconfig, source='fit flags')
    except ValueError as e:
        raise ValueError(f'--ch / --ch-mult: {e}') from None


def _check_flags(args, config: VQGANConfig) -> None:
    f = config.downsample_factor
    if args.img_size % f:
        raise ValueError(f'--img-size {args.img_size} is not a multiple of the downsampling factor {f} '
                         f'(2 ** (len(--ch-mult) - 1)); pick a multiple or fewer --ch-mult levels.')
    if args.disc_start is not None and args.disc_weight == 0:
        raise ValueError('--disc-start has no effect without --disc-weight > 0.')


def _check_data(args, config: VQGANConfig, num_train: int) -> None:
    if args.batch_size > num_train:
        raise ValueError(f'--batch-size {args.batch_size} exceeds the {num_train} training images; lower it.')
    grid = (args.img_size // config.downsample_factor) ** 2
    if num_train * grid < 4 * args.n_embed:
        raise ValueError(f'The training split gives {num_train} images x {grid} latents = {num_train * grid}, too '
                         f'few to fit --n-embed {args.n_embed} codes (need >= 4 latents per code): use a smaller '
                         f'--n-embed or more data.')


def _load_lpips(device):
    try:
        from taming.modules.losses.lpips import LPIPS
        return LPIPS().eval().requires_grad_(False).to(device)
    except Exception as e:  # import (requests), torchvision VGG16 download, vgg_lpips download
        raise RuntimeError(
            f'--perceptual-weight needs LPIPS (torchvision VGG16 ImageNet weights and taming\'s vgg_lpips.pth, '
            f'downloaded on first use), which could not be loaded here ({type(e).__name__}: '
            f'{str(e).splitlines()[0][:200] if str(e) else ""}). Load it once on a machine with network so the '
            f'files are cached, or use --perceptual-weight 0.') from None


class _PatchGAN:
    """taming's NLayerDiscriminator with the hinge loss and the adaptive generator weight.

    taming's 3 stride-2 layers need images of 24 px or more; smaller images get fewer layers.
    """

    def __init__(self, lr: float, img_size: int, device):
        from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
        n_layers = 3
        while n_layers > 1 and img_size // 2 ** n_layers < 3:
            n_layers -= 1
        self.net = NLayerDiscriminator(input_nc=3, n_layers=n_layers).apply(weights_init).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.5, 0.9))

    def generator_loss(self, rec: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        g_loss = -self.net(rec).mean()
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        return weight * g_loss

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        loss = 0.5 * (F.relu(1.0 - self.net(real)).mean() + F.relu(1.0 + self.net(fake.detach())).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> Dict:
        return dict(net=self.net.state_dict(), optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state: Dict) -> None:
        self.net.load_state_dict(state['net'])
        self.optimizer.load_state_dict(state['optimizer'])


def _batches(num: int, batch_size: int, seed: int, epoch: int) -> List[List[int]]:
    """Shuffled full batches of an epoch; a function of (seed, epoch) so a resumed run replays them."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, num - batch_size + 1, batch_size)]


@torch.no_grad()
def _reinit_dead_codes(model: VQModel, optimizer: torch.optim.Optimizer, counts: torch.Tensor, x: torch.Tensor,
                       generator: torch.Generator) -> int:
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    latents = model.encode_latent(x * 2 - 1).permute(0, 2, 3, 1).reshape(-1, model.config.embed_dim).float()
    pick = torch.randint(latents.shape[0], (dead.numel(),), generator=generator).to(latents.device)
    weight = model.quantize.embedding.weight
    weight[dead] = latents[pick]
    for moment in optimizer.state.get(weight, {}).values():
        if torch.is_tensor(moment) and moment.shape == weight.shape:
            moment[dead] = 0
    return int(dead.numel())


@torch.no_grad()
def evaluate_vqgan(discretizer: VQGANDiscretizer, dataset, batch_size: int = 250) -> Dict[str, float]:
    """PSNR (from the mean squared error over all pixels) and codebook usage of ``reconstruct`` on a dataset.

    Example:
        >>> evaluate_vqgan(create_vqgan('output/vqgan/bundled_mnist'), val_images)['psnr']
    """
    device = next(discretizer.parameters()).device
    sq_err, pixels, used = 0.0, 0, torch.zeros(discretizer.n_embed, dtype=torch.bool)
    for x in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x = x.to(device)
        codes = discretizer.encode(x)
        rec = discretizer.decode(codes)
        sq_err += float(((rec - x) ** 2).sum())
        pixels += x.numel()
        used[codes.flatten().cpu().unique()] = True
    mse = sq_err / pixels
    return dict(psnr=10 * math.log10(1.0 / max(mse, 1e-12)), mse=mse, codes_used=int(used.sum()),
                code_usage=float(used.float().mean()))


def _save_grid(discretizer: VQGANDiscretizer, dataset, count: int, path: str) -> None:
    n = min(count, len(dataset))
    x = torch.stack([dataset[i * len(dataset) // n] for i in range(n)]).to(next(discretizer.parameters()).device)
    grid = torch.cat([x, discretizer.reconstruct(x)]).cpu()
    atomic_write(path, lambda p: save_image(grid, p, nrow=n, padding=1, format='png'))


def _atomic_json(path: str, content) -> None:
    def write(p):
        with open(p, 'w') as f:
            json.dump(content, f, indent=2)
    atomic_write(path, write)


def _load_state(args, path: str) -> Dict:
    if not os.path.isfile(path):
        raise ValueError(f'--resume: {path!r} does not exist; run without --resume to start a fit in --out.')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'--resume: cannot read {path!r} ({type(e).__name__}); it is corrupt or not a fit '
                         f'state.') from None
    saved = state['args']
    changed = [k for k, v in saved.items() if k not in _RESUME_MAY_CHANGE and getattr(args, k, None) != v]
    if changed:
        k = changed[0]
        raise ValueError(f'--resume: --{k.replace("_", "-")} is {getattr(args, k)!r} but the run in {args.out!r} '
                         f'used {saved[k]!r}; only {", ".join("--" + c.replace("_", "-") for c in _RESUME_MAY_CHANGE)}'
                         f' may change on resume.')
    if args.steps <= state['step']:
        raise ValueError(f'--resume: the run in {args.out!r} already did {state["step"]} steps; raise --steps.')
    return state


def _checkpoint(args, model: VQModel, optimizer, gan: Optional[_PatchGAN], counts: torch.Tensor, history: List,
                seconds: float, step: int, record: Dict, val_set) -> Dict:
    """Validates, then writes the model folder, the grid, metrics.json and last.pth; returns the metrics."""
    frozen = VQGANDiscretizer(copy.deepcopy(model), source=args.out)
    metrics = dict(step=step, train_seconds=round(seconds, 1), **record, **evaluate_vqgan(frozen, val_set))
    _logger.info(f'step {step}: validation PSNR {metrics["psnr"]:.2f} dB, codes used '
                 f'{metrics["codes_used"]}/{model.config.n_embed}')
    summary = dict(metrics, dataset=args.dataset or (args.data_dir and 'folder') or DEFAULT_DATASET,
                   img_size=args.img_size, val_images=len(val_set))
    save_vqgan(model, args.out, metadata=dict(fit=summary))
    _save_grid(frozen, val_set, args.grid_images, os.path.join(args.out, 'reconstructions.png'))
    history = history + [metrics]
    _atomic_json(os.path.join(args.out, 'metrics.json'), history)
    training = dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), counts=counts,
                    history=history, seconds=seconds, args=vars(args).copy())
    if gan is not None:
        training['gan'] = gan.state_dict()
    atomic_write(os.path.join(args.out, STATE_FILE), lambda p: torch.save(training, p))
    return metrics


def fit_vqgan(args: argparse.Namespace) -> Dict:
    """Fits a VQGAN as ``python -m timm_adv.vqgan fit`` does; returns the final validation figures.

    Example:
        >>> parser = argparse.ArgumentParser(); add_fit_args(parser)
        >>> result = fit_vqgan(parser.parse_args(['--steps', '300', '--out', '/tmp/vq']))
    """
    config = _config(args)
    _check_flags(args, config)
    state_path = os.path.join(args.out, STATE_FILE)
    if not args.resume and os.path.exists(state_path):
        raise ValueError(f'--out {args.out!r} already holds a fit ({STATE_FILE}); pass --resume to continue it or '
                         f'choose another --out.')
    state = _load_state(args, state_path) if args.resume else None
    device = torch.device(args.device)
    lpips = _load_lpips(device) if args.perceptual_weight > 0 else None
    train_set, val_set = _datasets(args)
    _check_data(args, config, len(train_set))
    disc_start = args.disc_start if args.disc_start is not None else args.steps // 2

    torch.manual_seed(args.seed)
    model = VQModel(config, beta=args.beta, legacy=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    gan = _PatchGAN(args.lr, args.img_size, device) if args.disc_weight > 0 else None
    step, counts, history, seconds = 0, torch.zeros(config.n_embed, dtype=torch.long), [], 0.0
    if state is not None:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        if gan is not None:
            gan.load_state_dict(state['gan'])
        step, counts, history, seconds = state['step'], state['counts'], state['history'], state['seconds']
        _logger.info(f'Resuming {args.out} at step {step}')
    os.makedirs(args.out, exist_ok=True)

    from tqdm import tqdm
    steps_per_epoch = len(train_set) // args.batch_size
    last_layer = model.decoder.conv_out.weight
    progress = tqdm(total=args.steps, initial=step, desc='fit vqgan', mininterval=5, file=sys.stderr)
    start = time.perf_counter()
    record = {}
    while step < args.steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(train_set, num_workers=args.workers,
                                             batch_sampler=_batches(len(train_set), args.batch_size, args.seed,
                                                                    epoch)[offset:])
        for x in loader:
            x = x.to(device)
            model.train()
            if args.dead_code_every and step % args.dead_code_every == 0:
                generator = torch.Generator().manual_seed(args.seed * 100003 + step)
                record['codes_reinitialised'] = _reinit_dead_codes(model, optimizer, counts, x, generator)
                counts.zero_()
            target = x * 2 - 1
            rec, qloss, indices = model(target)
            counts += torch.bincount(indices.flatten().cpu(), minlength=config.n_embed)
            nll = (rec - target).abs().mean() if args.rec_loss == 'l1' else ((rec - target) ** 2).mean()
            if lpips is not None:
                nll = nll + args.perceptual_weight * lpips(target, rec).mean()
            loss = nll + args.codebook_weight * qloss
            gan_on = gan is not None and step >= disc_start
            if gan_on:
                loss = loss + args.disc_weight * gan.generator_loss(rec, nll, last_layer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if gan_on:
                record['disc_loss'] = gan.step(target, rec)
            step += 1
            record.update(loss=float(loss.detach()), rec_loss=float(nll.detach()), codebook_loss=float(qloss.detach()))
            progress.update(1)
            progress.set_postfix(loss=f'{record["loss"]:.4f}', refresh=False)
            if step % args.eval_every == 0 or step == args.steps:
                seconds += time.perf_counter() - start
                history.append(_checkpoint(args, model, optimizer, gan, counts, history, seconds, step, record,
                                           val_set))
                start = time.perf_counter()
            if step == args.steps:
                break
    progress.close()
    return dict(history[-1], out=args.out, config=os.path.join(args.out, CONFIG_FILE),
                weights=os.path.join(args.out, WEIGHTS_FILE))

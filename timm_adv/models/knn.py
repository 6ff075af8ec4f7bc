"""kNN classification over a feature bank: the classifier of self-supervised representations.

A :class:`FeatureBank` holds the L2-normalised features of a labelled set (the training split)
and their labels. :class:`KNNClassifier` wraps a feature model (a timm model with
``num_classes=0``): it embeds the input, finds the ``k`` most cosine-similar bank entries and
returns the log of their vote. The default vote is similarity-weighted, ``log p(c) = log sum_{i in
kNN, y_i = c} exp(s_i / T) - log sum_{i in kNN} exp(s_i / T)`` (the weighted kNN of Wu et al., 2018);
``vote='count'`` is DkNN's unweighted count. The weighted vote is the default because it is
differentiable w.r.t. the input through the selected similarities (a PGD with cross-entropy on it
attacks the kNN itself) and it breaks the ties a count of 75 leaves; its top-1 equals the count's as
``T`` grows. Neither vote alone can be trusted under attack: when all ``k`` neighbours share a label the
weighted vote is one-hot and its gradient vanishes, so robust accuracy is always the per-sample worst
case over the soft-vote PGD and the kNN-guided attack (:func:`timm_adv.evaluation.evaluate_knn_robustness`).

Memory at ImageNet scale (1.28M x 2048): the bank is stored in ``dtype`` (float16 / bfloat16 halve
float32's 10.5 GB) while similarities are computed in float32 one chunk of the bank at a time, so
a search of a batch of ``B`` holds ``B x chunk_size`` similarities, never ``B x N``.
:func:`build_feature_bank` fills a preallocated bank (no concatenation peak) and, under
``torch.distributed``, embeds one shard per process and gathers the shards into it. The ``faiss``
backend (the optional ``faiss-cpu`` package, ``pip install 'timm-adv[knn]'``; GPU faiss is used
when present and the bank is on a GPU) builds its exact inner-product index once per bank and
finds the same neighbours; similarities are then recomputed in torch so that gradients and values
are identical.
"""
import copy
import math
import os
from contextlib import nullcontext
from typing import Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm_adv.utils.errors import ParameterError
from timm_adv.utils.similarity import DEFAULT_CHUNK

__all__ = ['KNN_BACKENDS', 'KNN_VOTES', 'BANK_DTYPES', 'BANK_FILE', 'FeatureBank', 'KNNClassifier', 'knn_search',
           'build_feature_bank', 'load_feature_bank', 'save_feature_bank', 'import_faiss', 'check_bank',
           'check_knn_settings', 'bank_bytes', 'input_keys', 'DEFAULT_CHUNK']

KNN_BACKENDS = ('torch', 'faiss')
#: ``weighted``: sum of ``exp(cos / T)`` per class (default); ``count``: DkNN's unweighted count.
KNN_VOTES = ('weighted', 'count')
#: Storage dtypes of the bank features (similarities are always float32).
BANK_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
#: File name of a feature bank published beside an exported feature model.
BANK_FILE = 'knn_bank.safetensors'
#: Similarity-weight floor that keeps log-probabilities of classes without votes finite.
_MIN_VOTE = 1e-12
#: Size of the input fingerprint that finds a training image's own bank entry.
KEY_DIM = 8


def input_keys(x: torch.Tensor) -> torch.Tensor:
    """A fingerprint ``[B, 8]`` of each input: a fixed random projection of its pixels (the same for the same input).

    The bank keeps one per entry, so a training image finds its own entry whatever the weights have become
    since the bank was embedded (a feature comparison would stop matching after a few steps).
    """
    flat = x.detach().flatten(1).float()
    g = torch.Generator().manual_seed(flat.shape[1])
    projection = torch.randn(flat.shape[1], KEY_DIM, generator=g).to(flat.device)
    return flat @ projection


def import_faiss():
    """Imports ``faiss`` or fails with the install command."""
    try:
        import faiss
    except ImportError:
        raise ImportError("--knn-backend faiss needs the optional faiss-cpu package: pip install 'timm-adv[knn]' "
                          "(or pip install faiss-cpu), or use --knn-backend torch.") from None
    return faiss


def bank_bytes(num: int, dim: int, dtype: torch.dtype = torch.float32, keys: bool = True) -> int:
    """Bytes of a bank of ``num x dim`` features in ``dtype``, its int64 labels and (``keys``) its float32 input
    keys: ``N * (D * s + 8 + 32)``."""
    return int(num) * (int(dim) * torch.empty(0, dtype=dtype).element_size() + 8 + (4 * KEY_DIM if keys else 0))


class FeatureBank:
    """L2-normalised features ``[N, D]`` of a labelled set, their labels ``[N]`` and the class count.

    Features are normalised in float32 and stored in ``dtype`` (default float32); ``keys`` ``[N, 8]`` are the
    entries' :func:`input_keys`, when the bank was embedded by :func:`build_feature_bank`. ``normalize=False``
    keeps features that are normalised already bit for bit (saved banks). The faiss index of the bank
    is built on first use and kept with it: a refreshed bank is a new object, so one build per refresh.

    Example:
        >>> bank = FeatureBank(torch.randn(100, 64), torch.randint(0, 10, (100,)), num_classes=10)
        >>> bank.features.norm(dim=1)  # all ones
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                 normalize: bool = True, dtype: Optional[torch.dtype] = None, keys: Optional[torch.Tensor] = None):
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f'A feature bank needs features [N, D] and labels [N], got {tuple(features.shape)} and '
                             f'{tuple(labels.shape)}.')
        if features.shape[0] == 0:
            raise ValueError('A feature bank needs at least one entry; the bank split is empty.')
        dtype = dtype or (features.dtype if features.is_floating_point() and not normalize else torch.float32)
        if normalize:
            features = F.normalize(features.detach().float(), dim=1)
        self.features = features.detach().to(dtype)
        self.labels = labels.detach().long()
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes:
            raise ValueError(f'Bank labels must lie in [0, {self.num_classes}), got [{int(self.labels.min())}, '
                             f'{int(self.labels.max())}].')
        self.keys = keys
        self._faiss_index = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def nbytes(self) -> int:
        keys = 0 if self.keys is None else self.keys.numel() * self.keys.element_size()
        return self.features.numel() * self.features.element_size() + self.labels.numel() * 8 + keys

    def to(self, device) -> 'FeatureBank':
        if self.features.device == torch.device(device):
            return self
        return FeatureBank(self.features.to(device), self.labels.to(device), self.num_classes, normalize=False,
                           keys=None if self.keys is None else self.keys.to(device))

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def faiss_index(self, chunk_size: int = DEFAULT_CHUNK):
        """The exact inner-product faiss index of the features, built once (on the GPU with GPU faiss)."""
        if self._faiss_index is None:
            faiss = import_faiss()
            index = faiss.IndexFlatIP(self.dim)
            for start in range(0, len(self), chunk_size):  # float32 copies of one chunk at a time
                index.add(self.features[start:start + chunk_size].float().cpu().contiguous().numpy())
            if self.features.is_cuda and hasattr(faiss, 'StandardGpuResources'):
                self._faiss_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._faiss_resources, self.features.device.index or 0, index)
            self._faiss_index = index
        return self._faiss_index


def _check_k(k: int, size: int) -> None:
    if not 1 <= k <= size:
        raise ValueError(f'--knn-k {k} must be between 1 and the bank size {size}.')


def knn_search(query: torch.Tensor, bank: Union[FeatureBank, torch.Tensor], k: int, backend: str = 'torch',
               chunk_size: int = DEFAULT_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner-product search of ``query`` ``[B, D]`` in ``bank`` (a bank or its ``[N, D]`` features).

    Similarities are float32 whatever the bank's storage dtype, computed ``chunk_size`` bank rows at a
    time. Returns ``(similarities [B, k], indices [B, k])`` in decreasing similarity; the similarities
    are differentiable w.r.t. ``query`` for both backends.

    Example:
        >>> sims, idx = knn_search(F.normalize(q, dim=1), bank, k=75)
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f'Unknown --knn-backend {backend!r}; choose one of {", ".join(KNN_BACKENDS)}.')
    features = bank.features if isinstance(bank, FeatureBank) else bank
    _check_k(k, features.shape[0])
    query = query.float()
    if backend == 'faiss':
        index = (bank if isinstance(bank, FeatureBank) else FeatureBank(features, torch.zeros(
            features.shape[0], dtype=torch.long, device=features.device), 1, normalize=False)).faiss_index(chunk_size)
        _, idx = index.search(query.detach().cpu().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).to(features.device)
        sims = (query.unsqueeze(1) * features[idx].to(query.device).float()).sum(-1)
        # faiss ranks with its own summation order: re-sort by the torch similarities
        sims, order = sims.sort(dim=1, descending=True)
        return sims, idx.to(query.device).gather(1, order)
    best_sims, best_idx = None, None
    for start in range(0, features.shape[0], chunk_size):
        chunk = features[start:start + chunk_size].to(query.device).float()
        sims, idx = (query @ chunk.t()).topk(min(k, chunk.shape[0]), dim=1)
        idx = idx + start
        if best_sims is not None:
            sims, order = torch.cat([best_sims, sims], 1).topk(k, dim=1)
            idx = torch.cat([best_idx, idx], 1).gather(1, order)
        best_sims, best_idx = sims, idx
    return best_sims, best_idx


class KNNClassifier(nn.Module):
    """A feature model plus a feature bank, behaving as a classifier (log-probabilities ``[B, C]``).

    Args:
        backbone: Feature model (``[B, D]`` output, e.g. ``timm.create_model(name, num_classes=0)``).
        bank: A :class:`FeatureBank`, or a callable returning the current one (a training task refreshes
            it lazily when the backbone's weights have changed).
        k: Neighbours that vote (75 as in Chen et al.).
        temperature: Vote weight ``exp(s / T)``.
        backend: ``torch`` or ``faiss`` exact search.
        vote: ``weighted`` (default, differentiable) or ``count`` (DkNN's unweighted count).
        exclude_self: Drop the bank entry of the query image itself (found by its :func:`input_keys`): a
            training image's own entry, which would vote its label (used while training on the bank's split).

    Example:
        >>> knn = KNNClassifier(timm.create_model('resnet10t', num_classes=0), bank, k=75)
        >>> knn(x).argmax(1)   # kNN predictions
    """

    def __init__(self, backbone: nn.Module, bank: Union[FeatureBank, Callable[[], FeatureBank]], k: int = 75,
                 temperature: float = 0.07, backend: str = 'torch', vote: str = 'weighted',
                 exclude_self: bool = False):
        super().__init__()
        check_knn_settings(k, temperature, backend, vote)
        self.backbone = backbone
        self._bank = bank
        self.k = int(k)
        self.temperature = float(temperature)
        self.backend = backend
        self.vote_mode = vote
        self.exclude_self = exclude_self
        if isinstance(bank, FeatureBank):
            check_bank(bank, self.k + int(exclude_self))

    @property
    def bank(self) -> FeatureBank:
        return self._bank() if callable(self._bank) else self._bank

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of ``x``."""
        return F.normalize(self.backbone(x).float(), dim=1)

    def neighbours(self, features: torch.Tensor, bank: FeatureBank,
                   keys: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Similarities and indices ``[B, k]`` of the voters; with ``keys`` (the queries' :func:`input_keys`)
        and a bank that has keys, each query's own entry is left out."""
        if keys is None or bank.keys is None:
            return knn_search(features, bank, self.k, self.backend)
        sims, idx = knn_search(features, bank, self.k + 1, self.backend)
        keys = keys.to(bank.keys.device)
        own = ((bank.keys[idx] - keys.unsqueeze(1)).norm(dim=-1) <= 1e-4 * (1 + keys.norm(dim=1, keepdim=True)))
        own = own.to(sims.device)
        # one entry per row is dropped: the query's own one, else the farthest of the k + 1
        drop = torch.where(own.any(dim=1), own.float().argmax(dim=1), torch.full_like(idx[:, 0], self.k))
        keep = torch.ones_like(own).scatter_(1, drop.unsqueeze(1), False)
        return sims[keep].view(-1, self.k), idx[keep].view(-1, self.k)

    def vote(self, features: torch.Tensor, bank: Optional[FeatureBank] = None,
             keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Log-probabilities of the vote of the ``k`` nearest bank entries of ``features`` (see :meth:`neighbours`)."""
        bank = (bank or self.bank).to(features.device)
        sims, idx = self.neighbours(features, bank, keys)
        if self.vote_mode == 'count':
            weights = torch.ones_like(sims)
        else:
            weights = torch.exp((sims - 1.0) / self.temperature)  # shifted by the maximum cosine: no overflow
        votes = torch.zeros(features.shape[0], bank.num_classes, device=features.device, dtype=weights.dtype)
        votes = votes.scatter_add(1, bank.labels[idx], weights)
        return votes.clamp_min(_MIN_VOTE).log() - votes.sum(1, keepdim=True).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank  # resolved before the forward: a refresh never runs inside an attack's graph
        return self.vote(self.embed(x), bank, input_keys(x) if self.exclude_self else None)


def check_knn_settings(k: int, temperature: float, backend: str = 'torch', vote: str = 'weighted') -> None:
    """Fails early on kNN settings that cannot work (a missing faiss included)."""
    if int(k) != k or k < 1:
        raise ParameterError('k', f'must be an integer >= 1, got {k}.')
    if not temperature > 0:
        raise ParameterError('temperature', f'must be > 0, got {temperature}.')
    if backend not in KNN_BACKENDS:
        raise ParameterError('backend', f'must be one of {", ".join(KNN_BACKENDS)}, got {backend!r}.')
    if vote not in KNN_VOTES:
        raise ParameterError('vote', f'must be one of {", ".join(KNN_VOTES)}, got {vote!r}.')
    if backend == 'faiss':
        import_faiss()


def check_bank(bank: FeatureBank, k: int, num_features: Optional[int] = None, flag: str = '--knn-bank') -> None:
    """Fails clearly on a bank that cannot serve this kNN."""
    if num_features is not None and bank.dim != num_features:
        raise ValueError(f'{flag}: the bank holds {bank.dim}-d features but the model gives {num_features}-d ones; '
                         f'use the bank exported with this model or rebuild it with --knn-bank-split train.')
    if not 1 <= k <= len(bank):
        raise ValueError(f'--knn-k {k} must be between 1 and the bank size {len(bank)}; lower --knn-k or use a '
                         f'larger bank.')


def _shard(dataset, rank: int, world: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` of the bank that process ``rank`` embeds: equal contiguous shards, the last shorter."""
    per_rank = math.ceil(len(dataset) / world)
    return min(rank * per_rank, len(dataset)), min((rank + 1) * per_rank, len(dataset))


def _shard_loader(loader, start: int, end: int):
    """The same loader over rows ``[start, end)`` of its dataset (timm loaders and plain DataLoaders alike)."""
    from torch.utils.data import DataLoader, Subset
    inner = getattr(loader, 'loader', loader)  # timm's PrefetchLoader wraps a DataLoader
    shard = DataLoader(Subset(inner.dataset, range(start, end)), batch_size=inner.batch_size, shuffle=False,
                       num_workers=inner.num_workers, collate_fn=inner.collate_fn, pin_memory=inner.pin_memory)
    if inner is loader:
        return shard
    wrapped = copy.copy(loader)
    wrapped.loader = shard
    return wrapped


@torch.no_grad()
def build_feature_bank(backbone: nn.Module, loader, num_classes: Optional[int] = None,
                       device: Optional[torch.device] = None, amp_autocast: Callable = None,
                       dtype: torch.dtype = torch.float32, distributed: Optional[bool] = None) -> FeatureBank:
    """Embeds ``loader``'s dataset with ``backbone`` in eval mode (training flags restored after).

    The bank is preallocated (``N x D`` in ``dtype``) and filled batch by batch. Under an initialised
    ``torch.distributed`` (or ``distributed=True``) each process embeds one contiguous shard of the
    dataset and the shards are all-gathered straight into the preallocated bank, so every process
    ends with the same bank at ``1 / world`` of the embedding work.

    Example:
        >>> bank = build_feature_bank(model, bank_loader, num_classes=10, dtype=torch.float16)
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dataset = getattr(getattr(loader, 'loader', loader), 'dataset', None)
    if distributed and dataset is None:
        raise ValueError('A sharded feature bank needs a loader over a map-style dataset.')
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    features = labels = keys = None
    try:
        if distributed:
            per_rank = math.ceil(len(dataset) / world)
            start, end = _shard(dataset, rank, world)
            loader = _shard_loader(loader, start, end)
            rows, offset = per_rank * world, start
        else:
            rows, offset = (len(dataset) if dataset is not None else None), 0
        chunks = []
        for input, target in loader:
            if device is not None:
                input, target = input.to(device), target.to(device)
            with amp_autocast() if amp_autocast is not None else nullcontext():
                out = backbone(input)
            out = F.normalize(out.float(), dim=1).to(dtype)
            key = input_keys(input).to(out.device)
            if rows is None:  # an iterable loader of unknown length: collect, then one copy
                chunks.append((out, target.long(), key))
                continue
            if features is None:
                features = torch.zeros(rows, out.shape[1], dtype=dtype, device=out.device)
                labels = torch.zeros(rows, dtype=torch.long, device=out.device)
                keys = torch.zeros(rows, KEY_DIM, device=out.device)
            features[offset:offset + out.shape[0]] = out
            labels[offset:offset + out.shape[0]] = target.long()
            keys[offset:offset + out.shape[0]] = key
            offset += out.shape[0]
    finally:
        for m, training in modes:
            m.training = training
    if rows is None:
        features, labels, keys = (torch.cat([c[i] for c in chunks]) for i in range(3))
    elif distributed:
        if features is None:  # an empty last shard still needs the feature size and the device
            raise ValueError(f'The bank split has {len(dataset)} images, fewer than the {world} processes.')
        dist.all_gather(list(features.split(per_rank)), features[rank * per_rank:(rank + 1) * per_rank].clone())
        dist.all_gather(list(labels.split(per_rank)), labels[rank * per_rank:(rank + 1) * per_rank].clone())
        dist.all_gather(list(keys.split(per_rank)), keys[rank * per_rank:(rank + 1) * per_rank].clone())
        features, labels, keys = features[:len(dataset)], labels[:len(dataset)], keys[:len(dataset)]
    return FeatureBank(features, labels, num_classes, normalize=False, dtype=dtype, keys=keys)


def save_feature_bank(bank: FeatureBank, path: str, metadata: Optional[dict] = None) -> None:
    """Writes the bank as safetensors (``features``, ``labels``; class count in the metadata), atomically."""
    from safetensors.torch import save_file
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta['num_classes'] = str(bank.num_classes)
    tmp = path + '.tmp'
    save_file({'features': bank.features.cpu().contiguous(), 'labels': bank.labels.cpu().contiguous()}, tmp,
              metadata=meta)
    os.replace(tmp, path)


def load_feature_bank(path: str, flag: str = '--knn-bank', dtype: Optional[torch.dtype] = None) -> FeatureBank:
    """Reads a bank written by :func:`save_feature_bank` (safetensors only: no code is ever unpickled),
    stored in ``dtype`` (default: the file's)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{flag} {path!r}: no such file; give a knn_bank.safetensors written by the export.')
    try:
        with safe_open(path, framework='pt') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f'{flag} {path!r}: cannot read it as safetensors ({type(e).__name__}: {e}).') from None
    if set(tensors) != {'features', 'labels'}:
        raise ValueError(f'{flag} {path!r}: a feature bank holds exactly "features" and "labels", found '
                         f'{sorted(tensors)}.')
    num_classes = int(meta['num_classes']) if 'num_classes' in meta else None
    return FeatureBank(tensors['features'], tensors['labels'], num_classes, normalize=False, dtype=dtype)

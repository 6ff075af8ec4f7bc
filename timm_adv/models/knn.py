"""kNN classification over a feature bank: the classifier of self-supervised representations.

A :class:`FeatureBank` holds the L2-normalised features of a labelled set (the training split)
and their labels. :class:`KNNClassifier` wraps a feature model (a timm model with
``num_classes=0``): it embeds the input, finds the ``k`` most cosine-similar bank entries and
returns the log of a similarity-weighted vote, ``log p(c) = log sum_{i in kNN, y_i = c}
exp(s_i / T) - log sum_{i in kNN} exp(s_i / T)`` (the weighted kNN of Wu et al., 2018). The vote
is differentiable w.r.t. the input through the selected similarities, so a PGD attack with
cross-entropy on these log-probabilities attacks the kNN itself.

Search is exact. The default backend is a chunked matrix product in torch; ``faiss`` (the
optional ``faiss-cpu`` package, ``pip install 'timm-adv[knn]'``) finds the same neighbours with an
exact inner-product index for banks too large for a dense product; the similarities are then
recomputed in torch so that gradients and values are identical.
"""
import os
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['KNN_BACKENDS', 'BANK_FILE', 'FeatureBank', 'KNNClassifier', 'knn_search', 'build_feature_bank', 'load_feature_bank',
           'save_feature_bank', 'import_faiss', 'check_bank', 'check_knn_settings']

KNN_BACKENDS = ('torch', 'faiss')
#: File name of a feature bank published beside an exported feature model.
BANK_FILE = 'knn_bank.safetensors'
#: Similarity-weight floor that keeps log-probabilities of classes without votes finite.
_MIN_VOTE = 1e-12


def import_faiss():
    """Imports ``faiss`` or fails with the install command."""
    try:
        import faiss
    except ImportError:
        raise ImportError("--knn-backend faiss needs the optional faiss-cpu package: pip install 'timm-adv[knn]' "
                          "(or pip install faiss-cpu), or use --knn-backend torch.") from None
    return faiss


class FeatureBank:
    """L2-normalised features ``[N, D]`` of a labelled set, their labels ``[N]`` and the class count.

    ``normalize=False`` keeps features that are normalised already bit for bit (saved banks).

    Example:
        >>> bank = FeatureBank(torch.randn(100, 64), torch.randint(0, 10, (100,)), num_classes=10)
        >>> bank.features.norm(dim=1)  # all ones
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
                 normalize: bool = True):
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f'A feature bank needs features [N, D] and labels [N], got {tuple(features.shape)} and '
                             f'{tuple(labels.shape)}.')
        if features.shape[0] == 0:
            raise ValueError('A feature bank needs at least one entry; the bank split is empty.')
        features = features.detach().float()
        self.features = F.normalize(features, dim=1) if normalize else features
        self.labels = labels.detach().long()
        self.num_classes = int(num_classes if num_classes is not None else int(self.labels.max()) + 1)
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes:
            raise ValueError(f'Bank labels must lie in [0, {self.num_classes}), got [{int(self.labels.min())}, '
                             f'{int(self.labels.max())}].')

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def to(self, device) -> 'FeatureBank':
        return FeatureBank(self.features.to(device), self.labels.to(device), self.num_classes, normalize=False)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


def knn_search(query: torch.Tensor, bank: torch.Tensor, k: int, backend: str = 'torch',
               chunk_size: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner-product search of ``query`` ``[B, D]`` in ``bank`` ``[N, D]``.

    Returns ``(similarities [B, k], indices [B, k])`` in decreasing similarity; the similarities are
    differentiable w.r.t. ``query`` for both backends.

    Example:
        >>> sims, idx = knn_search(F.normalize(q, dim=1), bank.features, k=75)
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f'Unknown --knn-backend {backend!r}; choose one of {", ".join(KNN_BACKENDS)}.')
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f'--knn-k {k} must be between 1 and the bank size {bank.shape[0]}.')
    if backend == 'faiss':
        faiss = import_faiss()
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank.detach().float().cpu().contiguous().numpy())
        _, idx = index.search(query.detach().float().cpu().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).to(query.device)
        sims = (query.unsqueeze(1) * bank[idx].to(query.dtype)).sum(-1)
        # faiss ranks in float32 with its own summation order: re-sort by the torch similarities
        sims, order = sims.sort(dim=1, descending=True)
        return sims, idx.gather(1, order)
    best_sims, best_idx = None, None
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start:start + chunk_size]
        sims, idx = (query @ chunk.to(query.dtype).t()).topk(min(k, chunk.shape[0]), dim=1)
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

    Example:
        >>> knn = KNNClassifier(timm.create_model('resnet10t', num_classes=0), bank, k=75)
        >>> knn(x).argmax(1)   # kNN predictions
    """

    def __init__(self, backbone: nn.Module, bank: Union[FeatureBank, Callable[[], FeatureBank]], k: int = 75,
                 temperature: float = 0.07, backend: str = 'torch'):
        super().__init__()
        check_knn_settings(k, temperature, backend)
        self.backbone = backbone
        self._bank = bank
        self.k = int(k)
        self.temperature = float(temperature)
        self.backend = backend
        if isinstance(bank, FeatureBank):
            check_bank(bank, self.k)

    @property
    def bank(self) -> FeatureBank:
        return self._bank() if callable(self._bank) else self._bank

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of ``x``."""
        return F.normalize(self.backbone(x).float(), dim=1)

    def vote(self, features: torch.Tensor, bank: Optional[FeatureBank] = None) -> torch.Tensor:
        """Log-probabilities of the weighted vote of the ``k`` nearest bank entries of ``features``."""
        bank = bank or self.bank
        sims, idx = knn_search(features, bank.features.to(features.device), self.k, self.backend)
        weights = torch.exp((sims - 1.0) / self.temperature)  # shifted by the maximum cosine: no overflow
        votes = torch.zeros(features.shape[0], bank.num_classes, device=features.device, dtype=weights.dtype)
        votes = votes.scatter_add(1, bank.labels.to(features.device)[idx], weights)
        return votes.clamp_min(_MIN_VOTE).log() - votes.sum(1, keepdim=True).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank  # resolved before the forward: a refresh never runs inside an attack's graph
        return self.vote(self.embed(x), bank)


def check_knn_settings(k: int, temperature: float, backend: str = 'torch') -> None:
    """Fails early on kNN settings that cannot work (a missing faiss included)."""
    if int(k) != k or k < 1:
        raise ValueError(f'--knn-k must be an integer >= 1, got {k}.')
    if not temperature > 0:
        raise ValueError(f'--knn-temperature must be > 0, got {temperature}.')
    if backend not in KNN_BACKENDS:
        raise ValueError(f'Unknown --knn-backend {backend!r}; choose one of {", ".join(KNN_BACKENDS)}.')
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


@torch.no_grad()
def build_feature_bank(backbone: nn.Module, loader, num_classes: Optional[int] = None,
                       device: Optional[torch.device] = None, amp_autocast: Callable = None) -> FeatureBank:
    """Embeds every batch of ``loader`` with ``backbone`` in eval mode (training flags restored after).

    Example:
        >>> bank = build_feature_bank(model, bank_loader, num_classes=10)
    """
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    features, labels = [], []
    try:
        for input, target in loader:
            if device is not None:
                input, target = input.to(device), target.to(device)
            if amp_autocast is not None:
                with amp_autocast():
                    out = backbone(input)
            else:
                out = backbone(input)
            features.append(F.normalize(out.float(), dim=1))
            labels.append(target.long())
    finally:
        for m, training in modes:
            m.training = training
    return FeatureBank(torch.cat(features), torch.cat(labels), num_classes)


def save_feature_bank(bank: FeatureBank, path: str, metadata: Optional[dict] = None) -> None:
    """Writes the bank as safetensors (``features``, ``labels``; class count in the metadata), atomically."""
    from safetensors.torch import save_file
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta['num_classes'] = str(bank.num_classes)
    tmp = path + '.tmp'
    save_file({'features': bank.features.cpu().contiguous(), 'labels': bank.labels.cpu().contiguous()}, tmp,
              metadata=meta)
    os.replace(tmp, path)


def load_feature_bank(path: str, flag: str = '--knn-bank') -> FeatureBank:
    """Reads a bank written by :func:`save_feature_bank` (safetensors only: no code is ever unpickled)."""
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
    return FeatureBank(tensors['features'], tensors['labels'], num_classes, normalize=False)

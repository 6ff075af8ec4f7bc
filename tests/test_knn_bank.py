"""The kNN at scale and under attack: worst-case robust accuracy, bank storage, chunking, sharding, faiss, self-exclusion."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm
from timm_adv.attacks import PGDAttack, attack_bn_mode, create_knn_guided_attack, select_guides
from timm_adv.evaluation import evaluate_knn_robustness, evaluate_robust_accuracy, knn_attacks
from timm_adv.models import FeatureBank, KNNClassifier, bank_bytes, build_feature_bank, input_keys, knn_search
from timm_adv.tasks import SSATTask


class _Centered(nn.Module):
    """Features = pixels - 0.5: a direction the attack can turn anywhere within the eps ball."""

    def forward(self, x):
        return x.flatten(1) - 0.5


def _agreeing_bank():
    # class 0 around (1, 0.1), class 1 around (0.1, 1): a query near class 0 sees only class-0 neighbours
    g = torch.Generator().manual_seed(0)
    c0 = torch.tensor([1.0, 0.1]) + 0.02 * torch.randn(20, 2, generator=g)
    c1 = torch.tensor([0.1, 1.0]) + 0.02 * torch.randn(20, 2, generator=g)
    return FeatureBank(torch.cat([c0, c1]), torch.tensor([0] * 20 + [1] * 20))


def test_agreeing_neighbours_zero_the_softvote_gradient_but_not_the_worst_case():
    knn = KNNClassifier(_Centered(), _agreeing_bank(), k=10, temperature=0.07)
    x = torch.tensor([[0.95, 0.55], [0.9, 0.52]]).view(2, 1, 1, 2).requires_grad_(True)
    y = torch.zeros(2, dtype=torch.long)
    F.nll_loss(knn(x), y).backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))  # the vote is one-hot: PGD through it has nothing to climb
    pgd = PGDAttack(eps=0.5, steps=10, step_size=0.1, random_start=False, mean=(0.0,), std=(1.0,))
    loader = [(x.detach(), y)]
    assert torch.equal(knn(x).argmax(1), y)  # clean: correct
    result = evaluate_knn_robustness(knn, loader, knn_attacks(pgd, num_guides=5))
    assert result['guided_top1'] == 0.0  # the guided attack needs no gradient of the vote: it flips both
    assert result['worst_top1'] == 0.0 <= result['softvote_top1']
    robust = evaluate_robust_accuracy(knn, loader, pgd)  # what train.py reports per epoch for a kNN
    assert robust['pgd_top1'] == 0.0 and robust['pgd_guided_top1'] == 0.0
    assert set(robust) == {'pgd_top1', 'pgd_softvote_top1', 'pgd_guided_top1'}


def test_worst_case_is_per_sample_not_the_minimum_of_the_figures():
    # each attack fools a different sample: each figure is 50%, the per-sample worst case 0%
    knn = KNNClassifier(nn.Flatten(), FeatureBank(torch.eye(2), torch.tensor([0, 1])), k=1)
    x, y = torch.eye(2), torch.tensor([0, 1])
    first = lambda model, x, y: torch.stack([x[1], x[1]])  # noqa: E731  sample 0 fooled
    second = lambda model, x, y: torch.stack([x[0], x[0]])  # noqa: E731  sample 1 fooled
    result = evaluate_knn_robustness(knn, [(x, y)], {'a': first, 'b': second})
    assert (result['a_top1'], result['b_top1'], result['worst_top1']) == (50.0, 50.0, 0.0)


def test_count_vote_counts_neighbours():
    bank = FeatureBank(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0]]), torch.tensor([1, 0, 0, 1]))
    knn = KNNClassifier(nn.Identity(), bank, k=3, vote='count')
    assert torch.allclose(knn(torch.tensor([[1.0, 0.05]])).exp(), torch.tensor([[2 / 3, 1 / 3]]))
    with pytest.raises(ValueError, match='^vote must be one of'):  # the parameter; train.py names --adv-knn-vote
        KNNClassifier(nn.Identity(), bank, k=3, vote='majority')


def test_half_precision_bank_bytes_and_same_neighbours():
    features, labels = torch.randn(3000, 32), torch.randint(0, 10, (3000,))
    query = F.normalize(torch.randn(16, 32), dim=1)
    full = FeatureBank(features, labels)
    for dtype in (torch.float16, torch.bfloat16):
        half = FeatureBank(features, labels, dtype=dtype)
        assert half.features.dtype == dtype and half.nbytes == bank_bytes(3000, 32, dtype, keys=False) == 3000 * (32 * 2 + 8)
        sims, idx = knn_search(query, half, 20, chunk_size=700)
        ref_sims, ref_idx = knn_search(query, full, 20)
        assert sims.dtype == torch.float32  # similarities are float32 whatever the storage
        assert torch.allclose(sims, ref_sims, atol=2e-2)
        assert (idx[:, :5] == ref_idx[:, :5]).float().mean() > 0.9  # only near-ties may swap
    assert full.nbytes == bank_bytes(3000, 32, keys=False) == 3000 * (32 * 4 + 8)


@pytest.mark.parametrize('mode', ['class', 'neighbours'])
def test_chunked_guide_selection_matches_the_dense_reference(mode):
    bank = FeatureBank(torch.randn(500, 16), torch.randint(0, 5, (500,)))
    features = F.normalize(torch.randn(8, 16), dim=1)
    reference = torch.randint(0, 5, (8,))
    sims = features @ bank.features.t()
    nearest = sims.masked_fill(bank.labels == reference[:, None], -2).argmax(1)  # the nearest wrong-class entry
    guide_class = bank.labels[nearest]
    anchors = features if mode == 'class' else bank.features[nearest]
    dense = (anchors @ bank.features.t()).masked_fill(bank.labels != guide_class[:, None], -2).topk(30, dim=1)
    expected = bank.features[dense.indices]
    for chunk in (37, 500, 65536):
        guides = select_guides(features, bank, reference, m=30, mode=mode, chunk_size=chunk)
        assert torch.equal(guides, expected), chunk
    assert (bank.labels[dense.indices] != reference[:, None]).all()


def test_neighbours_mode_surrounds_the_nearest_wrong_entry():
    # the official guide=2: guides nearest the nearest wrong-class entry (1), not nearest the sample
    bank = FeatureBank(torch.tensor([[1.0, 0.05], [0.8, 0.6], [0.7, -0.714], [0.6, 0.8], [0.0, -1.0]]),
                       torch.tensor([0, 1, 1, 1, 0]))
    x, reference = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert torch.equal(select_guides(x, bank, reference, m=2, mode='class')[0], bank.features[[1, 2]])
    assert torch.equal(select_guides(x, bank, reference, m=2, mode='neighbours')[0], bank.features[[1, 3]])


def test_training_knn_excludes_each_images_own_entry_after_the_weights_moved():
    images = torch.rand(50, 1, 2, 4)
    labels = torch.arange(50) % 5
    backbone = nn.Flatten()
    bank = build_feature_bank(backbone, DataLoader(TensorDataset(images, labels), batch_size=16), 5)
    assert bank.nbytes == bank_bytes(50, 8)  # features, labels and input keys
    plain = KNNClassifier(backbone, bank, k=1)
    own = KNNClassifier(backbone, bank, k=1, exclude_self=True)
    assert torch.equal(plain.neighbours(plain.embed(images), bank)[1][:, 0], torch.arange(50))  # nearest: itself
    with torch.no_grad():
        for drift in (0.0, 0.05):  # the backbone has moved since the bank was embedded: features no longer match
            features = F.normalize(images.flatten(1) + drift * torch.randn(50, 8), dim=1)
            sims, idx = own.neighbours(features, bank, input_keys(images))
            assert (idx[:, 0] != torch.arange(50)).all()
            expected = (features @ bank.features.t()).scatter_(1, torch.arange(50)[:, None], -2).argmax(1)
            assert torch.equal(idx[:, 0], expected)  # the next nearest instead
    other = torch.rand(4, 1, 2, 4)  # images not in the bank lose the farthest of the k + 1
    sims, idx = own.neighbours(own.embed(other), bank, input_keys(other))
    assert torch.equal(idx, knn_search(own.embed(other), bank, 1)[1])
    exact = (bank.features @ bank.features.t()).fill_diagonal_(-2).argmax(1)
    assert torch.equal(own(images).argmax(1), labels[exact])  # the forward excludes it too


def _tiny_ssat():
    """An SSAT task over a 12-image bank (3 classes), k = 1."""
    model = timm.create_model('test_resnet', num_classes=0)
    x = torch.rand(12, 3, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.arange(12) % 3), batch_size=4)
    task = SSATTask(model, loader, 3, create_knn_guided_attack(eps=0.03, steps=1, num_guides=2), knn_k=1,
                    verbose=False)
    return model, x, task


def test_ssat_training_knn_excludes_own_entries():
    model, x, task = _tiny_ssat()
    bank = task.feature_bank()
    knn = task.knn_classifier(bank=bank)  # what the training step uses for the reference and the fooling check
    with torch.no_grad(), attack_bn_mode(knn.backbone, 'eval'):  # as the step judges its references
        idx = knn.neighbours(knn.embed(x), bank, input_keys(x))[1][:, 0]
    assert (idx != torch.arange(12)).all()


def test_bank_is_filled_in_place_and_sharded_path_matches(tmp_path):
    features, labels = torch.randn(103, 6), torch.randint(0, 4, (103,))
    loader = DataLoader(TensorDataset(features, labels), batch_size=10)
    bank = build_feature_bank(nn.Identity(), loader, 4, dtype=torch.bfloat16)
    assert bank.features.dtype == torch.bfloat16 and len(bank) == 103
    assert torch.allclose(bank.features.float(), F.normalize(features, dim=1), atol=1e-2)
    assert torch.equal(bank.labels, labels)
    # the sharded path (shard, embed, all_gather into the preallocated bank) on a one-process gloo group
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        sharded = build_feature_bank(nn.Identity(), loader, 4, dtype=torch.bfloat16, distributed=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(sharded.features, bank.features) and torch.equal(sharded.labels, bank.labels)


def test_faiss_index_is_built_once_per_bank(monkeypatch):
    builds = []

    class IndexFlatIP:  # an exact inner-product index in numpy, standing in for faiss
        def __init__(self, dim):
            builds.append(dim)
            self.data = np.zeros((0, dim), dtype=np.float32)

        def add(self, x):
            self.data = np.concatenate([self.data, x])

        def search(self, q, k):
            idx = np.argsort(-(q @ self.data.T), axis=1)[:, :k]
            return None, idx

    monkeypatch.setitem(sys.modules, 'faiss', types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    bank = FeatureBank(torch.randn(200, 8), torch.randint(0, 4, (200,)), dtype=torch.float16)
    knn = KNNClassifier(nn.Identity(), bank, k=5, backend='faiss')
    query = torch.randn(6, 8)
    for _ in range(3):
        out = knn(query)
    assert len(builds) == 1
    assert torch.equal(out.argmax(1), KNNClassifier(nn.Identity(), bank, k=5)(query).argmax(1))
    KNNClassifier(nn.Identity(), FeatureBank(torch.randn(200, 8), torch.randint(0, 4, (200,))), k=5,
                  backend='faiss')(query)
    assert len(builds) == 2  # a refreshed bank (a new object) gets its own index


def test_ssat_step_learns_only_from_pairs_that_fool_the_knn():
    # the task itself must drop the pairs whose adversarial image does not change the kNN's answer
    model, x, task = _tiny_ssat()
    task.train()
    for m in model.modules():  # no BN statistics drift between the steps: the kNN's answers stay put
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    bank = task.feature_bank()
    with torch.no_grad(), attack_bn_mode(model, 'eval'):
        clean = task.knn_classifier(bank=bank)(x).argmax(1)
    other = torch.stack([x[(clean != clean[i]).nonzero()[0, 0]] for i in range(12)])  # an image the kNN calls otherwise
    for adversarial, kept in ((lambda knn, x, ref, bank=None: x, 0.0),  # never fools: nothing to learn from
                              (lambda knn, x, ref, bank=None: other, 100.0)):  # always fools
        task.attack = adversarial
        out = task(x, None)
        assert float(out['fooled']) == kept
        model.zero_grad()
        out['loss'].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert (sum(float(g.abs().sum()) for g in grads) > 0) == (kept > 0)

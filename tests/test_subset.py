"""Evaluation subsets: evenly spaced and freshly drawn."""
from timm_adv.data import BundledMnist, random_subset, spread_subset


def test_random_subset_is_a_seeded_draw_without_repeats():
    dataset = BundledMnist('validation')
    first = random_subset(dataset, 300, seed=1)
    assert len(first) == 300 and len(set(first.indices)) == 300
    assert first.indices == sorted(first.indices)
    assert random_subset(dataset, 300, seed=1).indices == first.indices
    assert random_subset(dataset, 300, seed=2).indices != first.indices
    assert first.indices != spread_subset(dataset, 300).indices
    assert len(random_subset(dataset, 5000, seed=1)) == len(dataset)

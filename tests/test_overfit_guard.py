"""The catastrophic-overfitting guard: the collapse rule and its warn / stop / rollback actions."""
import logging

import pytest
import torch
import torch.nn as nn

from timm_adv.attacks import PGDAttack
from timm_adv.evaluation import GuardRecord, OverfitGuard, detect_collapse
from timm_adv.tasks import StandardTask


class _CurvedMargin(nn.Module):
    """Class-0 margin ``1 - curvature * ||x - 0.5||^2``: flat (zero gradient) at the clean images x = 0.5.

    FGSM from the clean point sees no gradient and cannot move; PGD from a random start follows the
    curvature. A large curvature is the gradient-masking signature of catastrophic overfitting.
    """

    def __init__(self, curvature: float):
        super().__init__()
        self.curvature = nn.Parameter(torch.tensor(float(curvature)))

    def forward(self, x):
        margin = 1.0 - self.curvature * (x - 0.5).pow(2).flatten(1).sum(1)
        return torch.stack([margin, -margin], dim=1)


def _guard_fixture(action):
    eps = 0.1
    x = torch.full((16, 1, 4, 4), 0.5)
    loader = [(x, torch.zeros(16, dtype=torch.long))]
    pgd = PGDAttack(eps, steps=5, random_start=True)
    fgsm = PGDAttack(eps, steps=1, random_start=False)
    model = _CurvedMargin(curvature=1.0)  # at |delta| = eps everywhere: margin 1 - 16 * 0.01 > 0, robust
    task = StandardTask(model, nn.CrossEntropyLoss(), verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return OverfitGuard(loader, pgd, fgsm, action=action, min_pgd_drop=10.0), task, model, optimizer


def test_detect_collapse_rule():
    history = [GuardRecord(0, 30.0, 40.0), GuardRecord(1, 45.0, 55.0)]
    assert detect_collapse(history, 2.0, 85.0) is history[1]   # PGD collapsed, FGSM rose
    assert detect_collapse(history, 2.0, 55.0) is history[1]   # FGSM held
    assert detect_collapse(history, 30.0, 40.0) is None        # both fell: plain degradation, not CO
    assert detect_collapse(history, 40.0, 90.0) is None        # PGD drop under 10 points
    assert detect_collapse([], 0.0, 100.0) is None


@pytest.mark.parametrize('action', ['warn', 'stop', 'rollback'])
def test_guard_fires_on_contrived_collapse(action, caplog):
    guard, task, model, optimizer = _guard_fixture(action)
    healthy = guard.check(0, task, optimizer)
    assert healthy == {'guard_pgd_top1': 100.0, 'guard_fgsm_top1': 100.0, 'co_detected': 0.0}
    assert guard.act(task, optimizer) is False

    with torch.no_grad():
        model.curvature.fill_(100.0)  # PGD now breaks every sample, FGSM still sees a flat point
    optimizer.state[model.curvature]['momentum_buffer'] = torch.tensor(7.0)
    with caplog.at_level(logging.WARNING):
        collapsed = guard.check(1, task, optimizer)
    assert collapsed == {'guard_pgd_top1': 0.0, 'guard_fgsm_top1': 100.0, 'co_detected': 1.0}
    assert 'CATASTROPHIC OVERFITTING at epoch 1' in caplog.text
    stop = guard.act(task, optimizer)
    assert stop is (action == 'stop')
    if action == 'rollback':
        assert model.curvature.item() == 1.0
        assert 'momentum_buffer' not in optimizer.state[model.curvature]  # optimizer rolled back too
        assert guard.check(2, task, optimizer)['co_detected'] == 0.0
    else:
        assert model.curvature.item() == 100.0


def test_guard_rejects_bad_action():
    with pytest.raises(ValueError, match='--adv-co-action'):
        OverfitGuard([], PGDAttack(0.1), PGDAttack(0.1, steps=1), action='explode')

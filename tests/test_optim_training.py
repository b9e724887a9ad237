"""Every optimizer trains a tiny MLP: the loss on a small 3-class problem falls.

Full-batch steps from the same initial weights (60 points, MLP 2-8-3, cross-entropy);
a method passes when the loss after ``STEPS`` updates is below a third of the initial
loss (all reach below 0.13 of it with these settings).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.optim import (
    FOOF,
    KFAC,
    SINGD,
    BlockDiagonal,
    Hierarchical,
    NaturalGradient,
    TwoLevelKFAC,
)

STEPS = 25


def problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=gen)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    y = torch.cdist(X, centers).argmin(dim=1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, nn.CrossEntropyLoss(), X, y


METHODS = {
    "ng": lambda m, f: NaturalGradient(m, f, lr=0.5, damping=1e-2, generator=torch.Generator()),
    "ng-blockdiag": lambda m, f: NaturalGradient(
        m, f, lr=0.3, damping=1e-1, fisher="exact", structure="block_diagonal"
    ),
    "kfac": lambda m, f: KFAC(m, f, lr=0.3, damping=1e-2, generator=torch.Generator()),
    "kfac-standard-amortised": lambda m, f: KFAC(
        m,
        f,
        lr=0.2,
        damping=1e-2,
        damping_mode="standard",
        fisher="exact",
        inverse_every=5,
        stats_steps=2,
        momentum=0.5,
        weight_decay=1e-4,
        kl_clip=1e-2,
    ),
    "foof": lambda m, f: FOOF(m, f, lr=0.3, damping=1e-1, inverse_every=3, momentum=0.3),
    "two-level": lambda m, f: TwoLevelKFAC(m, f, lr=0.3, damping=1e-2, fisher="exact"),
    "singd-ikfac": lambda m, f: SINGD(m, f, lr=0.2, preconditioner_lr=0.1),
    "singd-ingd-hier": lambda m, f: SINGD(
        m, f, lr=0.2, update_rule="ingd", structure=Hierarchical(2, 1)
    ),
    "singd-ingd-block": lambda m, f: SINGD(
        m, f, lr=0.2, update_rule="ingd", structure=BlockDiagonal(2), momentum=0.5
    ),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_decreases(name):
    model, loss_fn, X, y = problem()
    opt = METHODS[name](model, loss_fn)
    losses = [opt.step(X, y) for _ in range(STEPS)]
    with torch.no_grad():
        final = float(loss_fn(model(X), y))
    assert final < losses[0] / 3, f"{name}: {losses[0]:.3f} -> {final:.3f}"

"""``solve(capture.grad, λ)`` runs as ``natural_gradient(λ)`` exactly when the vector is
the capture's own unmodified gradient (identity, storage and version counter; values are
never compared), for ExactFisher and BlockDiagFisher."""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import RTOL
from torch import nn

import curvlab


def _capture():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    return capt, R.dense_ggn(model, loss_fn, X, y)


def _spy(obj, monkeypatch) -> list[float]:
    calls: list[float] = []
    original = obj.natural_gradient

    def counted(damping):
        calls.append(damping)
        return original(damping)

    monkeypatch.setattr(obj, "natural_gradient", counted)
    return calls


@pytest.mark.parametrize("kind", [curvlab.ExactFisher, curvlab.BlockDiagFisher])
def test_solve_of_own_gradient_takes_natural_gradient_route(kind, monkeypatch):
    capt, F = _capture()
    if kind is curvlab.BlockDiagFisher:
        F = F * _block_mask(capt)
    obj = kind(capt)
    calls = _spy(obj, monkeypatch)
    lam = 1e-2
    expect = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), capt.grad)
    assert R.rel_err(obj.solve(capt.grad, lam), expect) <= RTOL
    assert calls == [lam]
    # a copy with equal values takes the generic route
    assert R.rel_err(obj.solve(capt.grad.clone(), lam), expect) <= RTOL
    assert calls == [lam]
    # modified in place: generic route on the new values
    capt.grad.mul_(2.0)
    assert R.rel_err(obj.solve(capt.grad, lam), 2 * expect) <= RTOL
    assert calls == [lam]


def test_modified_and_restored_gradient_is_not_own():
    """A write that restores the values still bumps the version counter: the gradient
    route is not taken (the route decides by identity and version, not by values)."""
    capt, _ = _capture()
    assert capt.is_own_gradient(capt.grad)
    capt.grad.add_(1.0).sub_(1.0)
    assert not capt.is_own_gradient(capt.grad)
    assert not capt.is_own_gradient(capt.grad.clone())


def _block_mask(capt) -> torch.Tensor:
    mask = torch.zeros(capt.num_params, capt.num_params, dtype=torch.float64)
    for lc in capt.layers:
        mask[lc.info.slice, lc.info.slice] = 1
    return mask


@pytest.mark.parametrize("fisher", ["mc", "empirical", "exact"])
def test_kept_per_sample_gradients_match_the_contractions(fisher, monkeypatch):
    """Conv layers whose Gram goes through their per-sample gradients keep them (when no
    larger than their patches) and use them for ``Uᵀv``, ``U c`` and the natural
    gradient; the results equal the dense float64 reference and the route that contracts
    over every location (nothing kept: a memory budget that leaves no room)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)
    ).double()
    X = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher, generator=torch.Generator().manual_seed(1))
    if fisher == "exact":
        F = R.dense_ggn(model, loss_fn, X, y)
    elif fisher == "empirical":
        F = R.dense_empirical_fisher(model, loss_fn, X, y)
    else:
        F = R.dense_fisher_from_columns(model, X, capt.columns, capt.scale)
    v = R.random_vector(F.shape[0])
    eye = torch.eye(F.shape[0], dtype=F.dtype)

    def results(obj):
        return obj.natural_gradient(1e-2), obj.solve(v, 1e-1), obj.mv(v)

    kept = curvlab.ExactFisher(capt)
    got = results(kept)
    assert list(kept._kept) == ["0"]  # the conv layer (T = 36 ≥ C'·d_out)
    want = (
        torch.linalg.solve(F + 1e-2 * eye, capt.grad),
        torch.linalg.solve(F + 1e-1 * eye, v),
        F @ v,
    )
    for x, ref in zip(got, want):
        assert R.rel_err(x, ref) <= RTOL
    cols = kept.num_columns
    monkeypatch.setattr(curvlab.config.options, "memory_budget", 3 * cols * cols * 8)
    plain = curvlab.ExactFisher(capt)
    for x, ref in zip(results(plain), got):
        assert R.rel_err(x, ref) <= RTOL
    assert not plain._kept

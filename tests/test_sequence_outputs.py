"""Outputs with positions ``(N, T, K)``: token-level CE with ignored targets, MSE and
BCE on ``(N, T, D)`` outputs, against dense float64 references of the whole batch.

References (independent of capture): ``exact`` = Jᵀ ∇²_f L J with ``J`` the Jacobian
of the whole batch's output ``(N·T·K, P)`` and ``∇²_f L`` the Hessian of the loss as
the user writes it (``loss_fn(f.flatten(0, -2), y.flatten())`` for CE); ``empirical`` =
``s·c Σ_nt ∇ℓ_nt ∇ℓ_ntᵀ`` from the Jacobian of the per-token losses (curvlinops'
``EFLinearOperator``, peer-checked); ``mc`` exactly from the capture's own columns, and
in expectation against the GGN.  Tolerance: relative error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import pytest
import reference as R
import sequence_reference as S
import torch
from conftest import DAMPINGS, RTOL, mc_generator
from torch import Tensor, nn
from torch.func import hessian

import curvlab
from curvlab.errors import MemoryBudgetError, ShapeError

N, T, D, H, K = 3, 4, 3, 5, 3


class CausalMean(nn.Module):
    """Parameter-free causal mixing over positions: ``x_t ↦ mean_{s ≤ t} x_s``."""

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        return x.cumsum(1) / steps.view(1, -1, 1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), CausalMean(), nn.Linear(H, K)).double()


def _inputs(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, D, generator=g, dtype=torch.float64)


def _targets(loss_name: str, ignore_index: int = -100) -> Tensor:
    g = torch.Generator().manual_seed(2)
    if loss_name == "ce":
        y = torch.randint(0, K, (N, T), generator=g)
        y[0, 1] = y[2, 3] = y[1, 0] = ignore_index
        return y
    if loss_name == "bce":
        return torch.rand(N, T, K, generator=g, dtype=torch.float64)
    return torch.randn(N, T, K, generator=g, dtype=torch.float64)


def _loss(loss_name: str, reduction: str, ignore_index: int = -100) -> nn.Module:
    if loss_name == "ce":
        return nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)
    return {"mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss_name](reduction=reduction)


CASES = [
    ("ce", "mean"),
    ("ce", "sum"),
    ("mse", "mean"),
    ("mse", "sum"),
    ("bce", "mean"),
]


@pytest.mark.parametrize("loss_name,reduction", CASES)
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_positions_against_dense(loss_name, reduction, fisher):
    model, X, y = _model(), _inputs(), _targets(loss_name)
    loss_fn = _loss(loss_name, reduction)
    capt = curvlab.capture(model, loss_fn, X, y, fisher=fisher, generator=mc_generator(3))
    ref_loss = S.user_loss(loss_fn, model(X), y)
    assert abs(capt.loss - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    g_ref = R.flatten(torch.autograd.grad(ref_loss, list(R.trainable_params(model).values())))
    assert R.rel_err(capt.grad, g_ref) <= RTOL
    cols = {"exact": T * K, "empirical": T, "mc": 1}[fisher]
    assert capt.columns.shape == (cols, N, T, K)
    if fisher == "exact":
        ref = S.dense_ggn(model, loss_fn, X, y)
    elif fisher == "empirical":
        ref = S.dense_empirical(model, loss_fn, X, y)
    else:
        ref = S.dense_from_columns(model, X, capt.columns, capt.scale)
    obj = curvlab.ExactFisher(capt)
    R.assert_close_all(R.interface_errors(obj, ref, DAMPINGS), RTOL, f"{loss_name} {fisher}")
    lam = 0.1
    ng = obj.natural_gradient(lam)
    eye = torch.eye(ref.shape[0], dtype=torch.float64)
    assert R.rel_err(ng, torch.linalg.solve(ref + lam * eye, g_ref)) <= RTOL


def test_custom_ignore_index_and_counted_mean():
    model, X = _model(), _inputs()
    y = _targets("ce", ignore_index=2)
    y[y == 2] = 1  # class 2 is the ignore index: only the marked positions are ignored
    y[0, 1] = y[2, 3] = y[1, 0] = 2
    loss_fn = _loss("ce", "mean", ignore_index=2)
    y_ref = y.clone()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert capt.scale == 1.0 / (N * T - 3)
    F_ref = S.dense_ggn(model, loss_fn, X, y_ref)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), F_ref) <= RTOL


def test_mc_columns_unbiased_for_ggn():
    """Mean of the MC output-space matrix Σ_s g gᵀ over many draws equals the block
    diagonal loss Hessian (cross-position blocks vanish) within 5 standard errors,
    elementwise, at a fixed seed; the MC Fisher itself is checked exactly above."""
    model, X = _model(), _inputs()
    y = _targets("ce")
    loss_fn = _loss("ce", "sum")
    draws = 4000
    capt = curvlab.capture(
        model, loss_fn, X, y, fisher="mc", mc_samples=draws, generator=mc_generator(7)
    )
    g = capt.columns.reshape(draws, N, T * K) * draws**0.5  # undo the 1/√S weight
    outer = torch.einsum("snI,snJ->snIJ", g, g)
    mean, se = outer.mean(0), outer.std(0) / draws**0.5
    f = model(X).detach()
    Hf = hessian(lambda out: S.user_loss(loss_fn, out, y))(f).reshape(N, T * K, N, T * K)
    H_per_seq = torch.stack([Hf[n, :, n] for n in range(N)])
    assert bool(((mean - H_per_seq).abs() <= 5 * se + 1e-12).all())
    # and the statistic can fail: a wrongly scaled Hessian is rejected
    assert not bool(((mean - 1.5 * H_per_seq).abs() <= 5 * se + 1e-12).all())


def test_class_dimension_one_refused():
    model, X = _model(), _inputs()
    loss_fn = nn.CrossEntropyLoss()
    y = torch.zeros(N, K, dtype=torch.long)  # PyTorch's (N, C=T, d1=K) reading
    with pytest.raises(ShapeError, match="move the classes last"):
        curvlab.capture(model, loss_fn, X, y)


def test_ambiguous_reading_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, K)).double()
    X = torch.randn(N, K, D, dtype=torch.float64)  # T == K: both readings are valid
    y = torch.zeros(N, K, dtype=torch.long)
    with pytest.raises(ShapeError, match="ambiguous"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y)


def test_soft_targets_with_positions_refused():
    model, X = _model(), _inputs()
    y = torch.full((N, T, K), 1.0 / K, dtype=torch.float64)
    with pytest.raises(ShapeError, match="probability targets"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y)


def test_all_ignored_refused():
    model, X = _model(), _inputs()
    y = torch.full((N, T), -100)
    with pytest.raises(ShapeError, match="ignore_index"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y)


def test_exact_columns_over_budget_refused(monkeypatch):
    monkeypatch.setattr(curvlab.config.options, "memory_budget", 10_000)
    model, X, y = _model(), _inputs(), _targets("ce")
    with pytest.raises(MemoryBudgetError, match="fisher='mc'"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="mc")


def test_empirical_matches_curvlinops():
    curvlinops = pytest.importorskip("curvlinops")
    model, X = _model(), _inputs()
    y = torch.randint(0, K, (N, T), generator=torch.Generator().manual_seed(5))
    loss_fn = nn.CrossEntropyLoss()
    peer_model = nn.Sequential(model, S.ClassesFirst())  # curvlinops: class dimension 1
    params = list(R.trainable_params(model).values())
    op = curvlinops.EFLinearOperator(peer_model, loss_fn, params, [(X, y)])
    E = op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    capt = curvlab.capture(model, loss_fn, X, y, fisher="empirical")
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), E) <= RTOL
    ggn = curvlinops.GGNLinearOperator(peer_model, loss_fn, params, [(X, y)])
    G = ggn @ torch.eye(E.shape[0], dtype=torch.float64)
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), G) <= RTOL

"""Two-level KFAC and the coarse-space matrices (curvlab/optim/coarse.py, two_level.py).

* ``kfac_coarse_fisher`` equals the sums of the dense cross-layer Kronecker blocks
  ``1ᵀ(A_ij ⊗ G_ij)1`` built from hook records (tests/reference.py) for layers with
  equal ``T``, and is zero across different ``T``; it is PSD.
* ``exact_coarse_fisher`` equals ``Z F Zᵀ`` of the dense Fisher (any ``T``).
* One TwoLevelKFAC step equals ``−lr [KFAC⁻¹ g + Zᵀ(F_c + λI)⁻¹ Z g]`` with dense
  references for both damping modes.
* ``term_norms`` are the norms of the step's two terms, ``‖KFAC⁻¹ g‖`` and
  ``‖Zᵀ(F_c + λD)⁻¹ Z g‖``, against the same dense references.
* In float32, the coarse matrix of a deep batch-norm network is positive semi-definite
  to float64 rounding (its Grams are formed in float64).
* Repeated inversions with unchanged statistics give the same coarse matrix (the
  public reference code symmetrises its persistent buffer in place, so there the
  off-diagonals grow 1 → 2.5 → 4.75 → 8.1).
"""

from __future__ import annotations

import copy

import pytest
import reference as R
import torch
from conftest import build_problem

import curvlab
from curvlab.errors import OptionError
from curvlab.optim import TwoLevelKFAC, exact_coarse_fisher, kfac_coarse_fisher
from curvlab.optim.coarse import prolong, restrict

TOL = 1e-10


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def restriction(records: list[R.LayerRecord]) -> torch.Tensor:
    """Dense ``Z`` (L x P): row l is the indicator of layer l's slice."""
    Z = torch.zeros(len(records), records[-1].slice.stop, dtype=torch.float64)
    for i, r in enumerate(records):
        Z[i, r.slice] = 1.0
    return Z


def dense_coarse(records: list[R.LayerRecord], scale: float) -> torch.Tensor:
    """``Σ entries of A_ij ⊗ G_ij`` for layers with equal T (0 otherwise)."""
    L = len(records)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i, ri in enumerate(records):
        for j, rj in enumerate(records):
            n, t = ri.a.shape[:2]
            if rj.a.shape[1] != t:
                continue
            A = torch.einsum("ntk,ntj->kj", ri.a, rj.a) / (n * t)
            G = scale * torch.einsum("knto,kntp->op", ri.e, rj.e)
            out[i, j] = torch.kron(G, A).sum()
    return out


@pytest.mark.parametrize(
    "model_name, loss_name",
    [("mlp_mixed_bias", "ce-mean"), ("seq_mean", "mse-sum"), ("conv2d_same_dil", "bce-mean")],
)
def test_kfac_coarse_fisher_matches_dense_blocks(model_name, loss_name):
    prob = build_problem(model_name, loss_name)
    capt = prob.capture("exact")
    ref = prob.ref("exact", capt)
    F_c = kfac_coarse_fisher(capt)
    expect = dense_coarse(ref.records, ref.scale)
    assert R.rel_err(F_c, expect) < 1e-12
    assert torch.linalg.eigvalsh(F_c).min() > -1e-12 * F_c.abs().max()
    for i, f in enumerate(curvlab.KFAC(capt).factors.values()):
        assert F_c[i, i] == pytest.approx(float(f.A.sum() * f.G.sum()), rel=1e-12)
    if model_name == "conv2d_same_dil":  # T = 25, 16, 1: no cross-layer coupling
        assert torch.equal(F_c, torch.diag(F_c.diagonal()))


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
@pytest.mark.parametrize(
    "model_name, loss_name", [("mlp_tanh", "ce-mean"), ("conv2d_stride", "mse-mean")]
)
def test_exact_coarse_fisher(model_name, loss_name, fisher):
    prob = build_problem(model_name, loss_name)
    capt = prob.capture(fisher)
    ref = prob.ref(fisher, capt)
    Z = restriction(ref.records)
    assert R.rel_err(exact_coarse_fisher(capt), Z @ ref.F @ Z.T) < 1e-10


def test_restrict_prolong_are_adjoint():
    prob = build_problem("conv1d", "ce-mean")
    layers = curvlab.optim.KFAC(prob.model, prob.loss_fn).layers
    Z = restriction(prob.ref("exact", prob.capture("exact")).records)
    v = R.random_vector(prob.P, seed=1)
    c = torch.randn(len(layers), dtype=torch.float64)
    assert R.rel_err(restrict(layers, v), Z @ v) < 1e-14
    assert R.rel_err(prolong(layers, c), Z.T @ c) < 1e-14


def kfac_inverse_dense(records, scale, damping, mode) -> torch.Tensor:
    blocks = []
    for r in records:
        if mode == "standard":
            A, G = R.kfac_factors(r, scale)
            M = R.wb_to_flat(torch.kron(G, A), r) + damping * torch.eye(r.size, dtype=A.dtype)
        else:
            M = R.kfac_heuristic_dense(r, scale, damping)
        blocks.append(torch.linalg.inv(M))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("coarse_damping", ["paper", "consistent"])
@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
def test_step_equals_dense_formula(damping_mode, loss_name, coarse_damping):
    prob = build_problem("mlp_mixed_bias", loss_name)
    lr, lam = 0.4, 0.02
    capt = prob.capture("exact")
    ref = prob.ref("exact", capt)
    g = prob.grad()
    Z = restriction(ref.records)
    F_c = dense_coarse(ref.records, ref.scale)
    # paper: F_c + λI; consistent: Z (F̃ + λI) Zᵀ = F_c + λ Z Zᵀ
    eye = torch.eye(len(ref.records), dtype=torch.float64)
    damp = eye if coarse_damping == "paper" else Z @ Z.T
    coarse = Z.T @ torch.linalg.solve(F_c + lam * damp, Z @ g)
    fine = kfac_inverse_dense(ref.records, ref.scale, lam, damping_mode) @ g
    expect = -lr * (fine + coarse)

    model = copy.deepcopy(prob.model)
    before = flat_params(model)
    opt = TwoLevelKFAC(
        model,
        prob.loss_fn,
        lr=lr,
        damping=lam,
        damping_mode=damping_mode,
        fisher="exact",
        coarse_damping=coarse_damping,
    )
    with pytest.raises(OptionError, match="after a step"):
        _ = opt.term_norms
    opt.step(prob.X, prob.y)
    assert R.rel_err(flat_params(model) - before, expect) < TOL
    assert R.rel_err(opt.coarse_matrix, F_c) < 1e-12
    kfac_norm, coarse_norm = opt.term_norms
    assert kfac_norm == pytest.approx(float(fine.norm()), rel=TOL)
    assert coarse_norm == pytest.approx(float(coarse.norm()), rel=TOL)


@pytest.mark.parametrize("decay", [0.0, 0.95])
def test_coarse_matrix_does_not_accumulate(decay):
    prob = build_problem("mlp_relu_nobias", "ce-mean")
    opt = TwoLevelKFAC(
        copy.deepcopy(prob.model),
        prob.loss_fn,
        lr=0.0,
        damping=0.1,
        fisher="exact",
        ema_decay=decay,
    )
    seen = []
    for _ in range(5):
        opt.step(prob.X, prob.y)
        seen.append(opt.coarse_matrix)
    assert opt.inversions == 5
    fresh = kfac_coarse_fisher(prob.capture("exact"))
    assert (fresh - torch.diag(fresh.diagonal())).abs().max() > 0  # off-diagonals exist
    for F_c in seen:
        if decay == 0.0:
            assert torch.equal(F_c, seen[0])
        assert R.rel_err(F_c, fresh) < 1e-13
        assert torch.equal(F_c, F_c.T)


def test_coarse_matrix_psd_in_float32_deep_batchnorm():
    """A 32-layer width-10 network with train-mode BatchNorm in float32: ``F_c`` spans
    orders of magnitude; Grams formed in float32 leave an eigenvalue of about -1e-7
    (-7e-12 of the largest), far beyond float64 rounding."""
    torch.manual_seed(0)
    hidden = [
        m
        for _ in range(31)
        for m in (torch.nn.Linear(10, 10, bias=False), torch.nn.BatchNorm1d(10))
    ]
    model = torch.nn.Sequential(*hidden, torch.nn.Linear(10, 1, bias=False))
    x = torch.randn(512, 10)
    y = (x[:, :1] > 0).float()
    capt = curvlab.capture(model, torch.nn.BCEWithLogitsLoss(), x, y, fisher="mc")
    F_c = kfac_coarse_fisher(capt)
    assert F_c.dtype == torch.float64
    assert torch.linalg.eigvalsh(F_c).min() > -1e-13 * torch.linalg.eigvalsh(F_c).max()

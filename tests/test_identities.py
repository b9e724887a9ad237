"""Identities that hold exactly, independent of any reference implementation.

Tolerance: relative error ≤ RTOL = 1e-8 (float64) unless stated.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import MLP_NAMES, RTOL, build_problem, get_problem, mc_generator
from torch import nn
from torch.func import functional_call, hessian

import curvlab


@pytest.mark.parametrize("loss_name", ["mse-mean", "mse-sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_deep_linear_mse_kfac_is_exact_block_diagonal(loss_name, bias):
    """Deep linear net + MSE, exact Fisher: e_nc = W_{>l}ᵀ g_c does not depend on n, so
    each exact block s Σ_n Σ_c (e_c e_cᵀ) ⊗ (ā_n ā_nᵀ) factorises into G ⊗ A exactly."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=bias), nn.Linear(4, 5, bias=bias), nn.Linear(5, 3, bias=bias)
    ).double()
    X = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=loss_name.split("-")[1])
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    K = curvlab.KFAC(capt).to_dense()
    B = curvlab.BlockDiagFisher(capt).to_dense()
    F = R.dense_ggn(model, loss_fn, X, y)
    recs = R.layer_records(model, X, R.hessian_sqrt_columns(loss_fn, model(X), y))
    assert R.rel_err(B, R.block_diagonal_part(F, recs)) <= RTOL
    err = R.rel_err(K, B)
    assert err <= RTOL


@pytest.mark.parametrize("model_name", MLP_NAMES)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_repeated_input_kfac_equals_block_diagonal(model_name, loss_name, fisher):
    """A batch of one input (and label) repeated N times: ā_n and e_nc do not depend on n,
    so KFAC = exact block-diagonal Fisher (Linear layers, T = 1)."""
    p = build_problem(model_name, loss_name, n=5, repeat_input=True)
    capt = p.capture(fisher)
    err = R.rel_err(curvlab.KFAC(capt).to_dense(), curvlab.BlockDiagFisher(capt).to_dense())
    assert err <= RTOL


@pytest.mark.parametrize("model_name", MLP_NAMES)
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_batch_of_one_kfac_equals_block_diagonal(model_name, fisher):
    """N = 1: Σ_c (e_c e_cᵀ) ⊗ (ā āᵀ) = (Σ_c e_c e_cᵀ) ⊗ (ā āᵀ) for any columns."""
    p = build_problem(model_name, "ce-mean", n=1)
    capt = p.capture(fisher, mc_samples=3, generator=mc_generator(2))
    err = R.rel_err(curvlab.KFAC(capt).to_dense(), curvlab.BlockDiagFisher(capt).to_dense())
    assert err <= RTOL


@pytest.mark.parametrize("model_name", ["mlp_tanh", "seq_mean", "conv2d_stride"])
@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("damping", [1e-3, 1e-1, 10.0])
def test_kfac_damping_modes_differ_by_cross_terms(problem, damping):
    """(A + π√λ I) ⊗ (G + √λ/π I) = A ⊗ G + λ I + π√λ I ⊗ G + (√λ/π) A ⊗ I:
    heuristic solve = (K + λI + cross terms)⁻¹, standard solve = (K + λI)⁻¹."""
    capt = problem.capture("exact")
    ref = problem.ref("exact")
    v = R.random_vector(problem.P, seed=5)
    K = R.dense_kfac(ref.records, ref.scale)
    cross = []
    for r in ref.records:
        A, G = R.kfac_factors(r, ref.scale)
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        IA = torch.eye(A.shape[0], dtype=A.dtype)
        IG = torch.eye(G.shape[0], dtype=G.dtype)
        rt = damping**0.5
        cross.append(R.wb_to_flat(pi * rt * torch.kron(G, IA) + rt / pi * torch.kron(IG, A), r))
    X = torch.block_diag(*cross)
    lamI = damping * torch.eye(problem.P, dtype=K.dtype)
    std = curvlab.KFAC(capt, damping_mode="standard").solve(v, damping)
    heu = curvlab.KFAC(capt, damping_mode="heuristic").solve(v, damping)
    assert R.rel_err(std, torch.linalg.solve(K + lamI, v)) <= RTOL
    assert R.rel_err(heu, torch.linalg.solve(K + lamI + X, v)) <= RTOL


def test_foof_toy_benzing_appendix_f():
    """Inputs (3,1), (1,0), labels 1, −1, Linear(2,1,bias=False) at w = 0, squared loss (sum).
    ∇L = Σ 2(wᵀx − y) x = (−4, −2): SGD direction ∝ (2, 1); A = mean x xᵀ = ½[[10,3],[3,1]],
    so −∇L A⁻¹ = (−4, 16) ∝ (−1, 4)."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    X = torch.tensor([[3.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    capt = curvlab.capture(model, nn.MSELoss(reduction="sum"), X, y, fisher="exact")
    assert torch.allclose(capt.grad, torch.tensor([-4.0, -2.0], dtype=torch.float64))
    step = -curvlab.FOOF(capt).solve(capt.grad, damping=0.0)

    def cos(a, b):
        b = torch.tensor(b, dtype=torch.float64)
        return float(a @ b / (a.norm() * b.norm()))

    assert cos(step, [-1.0, 4.0]) == pytest.approx(1.0, abs=1e-12)
    assert cos(-capt.grad, [2.0, 1.0]) == pytest.approx(1.0, abs=1e-12)
    assert R.rel_err(step, torch.tensor([-4.0, 16.0], dtype=torch.float64)) <= RTOL


@pytest.mark.parametrize("loss_name", ["ce-mean", "ce-sum", "bce-mean", "mse-mean"])
def test_single_layer_ggn_is_hessian_and_exact_is_blockdiag(loss_name):
    """Network linear in its parameters (one Linear layer): GGN = ∇²_θ L exactly, and the
    full Fisher is its single block."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    p = build_problem("mlp_tanh", loss_name)  # borrow data/targets
    X = p.X
    names = [k for k, _ in model.named_parameters()]

    def loss_of(*vals):
        return p.loss_fn(functional_call(model, dict(zip(names, vals)), (X,)), p.y)

    vals = tuple(q.detach() for q in model.parameters())
    H = hessian(loss_of, argnums=tuple(range(len(vals))))(*vals)
    sizes = [v.numel() for v in vals]
    Hd = torch.cat(
        [
            torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(vals))], 1)
            for i in range(len(vals))
        ]
    )
    capt = curvlab.capture(model, p.loss_fn, X, p.y, fisher="exact")
    F = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(F, Hd) <= RTOL
    assert R.rel_err(curvlab.BlockDiagFisher(capt).to_dense(), F) <= RTOL


@pytest.mark.parametrize("model_name", ["mlp_tanh", "conv1d", "seq_flatten"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_traces_agree_across_objects(problem, fisher):
    """tr(ExactFisher) = tr(BlockDiag) = tr(EKFAC) = Σ_n,c ‖J_nᵀ g_nc‖² s; tr(KFAC) = Σ tr G tr A;
    tr(FOOF) = Σ d_out tr A."""
    capt = problem.capture(fisher, generator=mc_generator(9))
    ref = problem.ref(fisher, capt)
    t = ref.F.trace()
    for obj in (curvlab.ExactFisher(capt), curvlab.BlockDiagFisher(capt), curvlab.EKFAC(capt)):
        assert abs(float(obj.trace()) - float(t)) <= RTOL * float(t), type(obj).__name__
    tk = sum(
        float(G.trace() * A.trace()) for A, G in (R.kfac_factors(r, ref.scale) for r in ref.records)
    )
    assert abs(float(curvlab.KFAC(capt).trace()) - tk) <= RTOL * tk
    tf = sum(float(r.d_out * R.kfac_factors(r, 1.0)[0].trace()) for r in ref.records)
    assert abs(float(curvlab.FOOF(capt).trace()) - tf) <= RTOL * tf


def test_exact_fisher_solve_is_woodbury_consistent():
    """(F + λI) solve(v) = v for the full network (residual check, no reference matrix)."""
    p = get_problem("conv2d_same_dil", "ce-mean")
    capt = p.capture("exact")
    F = curvlab.ExactFisher(capt)
    v = R.random_vector(p.P, seed=3)
    for lam in (1e-3, 1e-1, 10.0):
        x = F.solve(v, lam)
        err = R.rel_err(F.mv(x) + lam * x, v)
        assert err <= RTOL, lam

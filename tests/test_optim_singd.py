"""SINGD: structured matrices, the IKFAC/INGD factor updates, the optimizer.

* Structures (dense, diagonal, block-diagonal with and without a tail block,
  hierarchical, clipped): products with dense matrices, composition (closure),
  trace and norm against dense algebra; ``m = ½Π̂(X)`` lies on the pattern and
  satisfies ``m + mᵀ = X`` on ``pattern ∪ patternᵀ``.
* IKFAC: with a fixed ``S`` the iteration reaches ``Π̂(Kᵀ(S + λI)K) = I`` for every
  structure, i.e. ``K Kᵀ = (S + λI)⁻¹`` for dense ``K``; one update from
  ``K₀K₀ᵀ = (S₀ + λI)⁻¹`` tracks ``(S₁ + λI)⁻¹``, ``S₁ = (1 − β₁)S₀ + β₁U``, with an
  error that scales as ``β₁²`` (halving β₁ divides it by ≈ 4).
* INGD: its fixed point is ``(KKᵀ)⁻¹ = [tr(U_C CCᵀ) U_K + λ tr(CCᵀ) I]/d_out`` (and
  likewise for ``C``).
* The optimizer's first step equals ``C₁C₁ᵀ ∇W̄ K₁K₁ᵀ`` with ``K₁``, ``C₁`` from the
  KFAC factors of the empirical-Fisher capture; it runs in bfloat16 without NaN.
"""

from __future__ import annotations

import copy

import pytest
import reference as R
import torch
from conftest import build_problem

import curvlab
from curvlab.optim import SINGD
from curvlab.optim.singd import ikfac_step, ingd_step
from curvlab.optim.structures import BlockDiagonal, Dense, Diagonal, Hierarchical

F64 = torch.float64
DIM = 7
STRUCTURES = [
    Dense(),
    Diagonal(),
    BlockDiagonal(3),
    BlockDiagonal(10),
    Hierarchical(2, 3),
    Hierarchical(0, 0),
    Hierarchical(9, 9),
]
IDS = ["dense", "diag", "block3", "block10", "hier2_3", "hier0_0", "hier9_9"]


def random_spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, 2 * d, generator=gen, dtype=F64)
    return m @ m.T / (2 * d)


def random_structured(s, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return s.project(torch.randn(DIM, DIM, generator=gen, dtype=F64))


@pytest.mark.parametrize("s", STRUCTURES, ids=IDS)
def test_structured_algebra(s):
    P, Q = random_structured(s, 0), random_structured(s, 1)
    Pd, Qd = P.to_dense(), Q.to_dense()
    pattern = s.pattern(DIM)
    assert torch.equal(Pd[~pattern], torch.zeros_like(Pd[~pattern]))
    assert torch.equal(s.identity(DIM, F64, "cpu").to_dense(), torch.eye(DIM, dtype=F64))
    M = torch.randn(DIM, 4, dtype=F64)
    assert R.rel_err(P.mm(M), Pd @ M) < 1e-14
    assert R.rel_err(P.tmm(M), Pd.T @ M) < 1e-14
    assert R.rel_err(P.rmm(M.T), M.T @ Pd) < 1e-14
    assert R.rel_err((P @ Q).to_dense(), Pd @ Qd) < 1e-14
    assert R.rel_err((P - Q * 2.0).to_dense(), Pd - 2 * Qd) < 1e-15
    assert P.trace().item() == pytest.approx(Pd.trace().item(), rel=1e-14)
    assert P.squared_norm().item() == pytest.approx(Pd.square().sum().item(), rel=1e-14)
    # closure of the pattern itself: dense products of pattern matrices stay on it
    A = torch.rand(DIM, DIM, dtype=F64) * pattern
    B = torch.rand(DIM, DIM, dtype=F64) * pattern
    assert ((A @ B)[~pattern] == 0).all()


@pytest.mark.parametrize("s", STRUCTURES, ids=IDS)
def test_projection_is_the_structured_natural_gradient(s):
    X = random_spd(DIM, 3)
    m = (s.project(X) * 0.5).to_dense()
    pattern = s.pattern(DIM)
    both = pattern | pattern.T
    assert (m[~pattern] == 0).all()
    assert R.rel_err((m + m.T)[both], X[both]) < 1e-15


@pytest.mark.parametrize("s", STRUCTURES, ids=IDS)
def test_ikfac_fixed_point(s):
    S, lam = random_spd(DIM, 4), 0.1
    K = s.identity(DIM, F64, "cpu")
    for _ in range(400):
        K = ikfac_step(K, S, lam, 0.3)
    Kd = K.to_dense()
    residual = s.project(Kd.T @ (S + lam * torch.eye(DIM, dtype=F64)) @ Kd).to_dense()
    assert R.rel_err(residual, torch.eye(DIM, dtype=F64)) < 1e-12
    if isinstance(s, Dense):
        target = torch.linalg.inv(S + lam * torch.eye(DIM, dtype=F64))
        assert R.rel_err(Kd @ Kd.T, target) < 1e-12


def test_ikfac_tracks_damped_inverse_to_second_order():
    S0, U, lam = random_spd(DIM, 5), random_spd(DIM, 6), 0.1
    eye = torch.eye(DIM, dtype=F64)
    evals, Q = torch.linalg.eigh(S0 + lam * eye)
    K0 = Dense().project(Q @ torch.diag(evals.rsqrt()) @ Q.T)  # K0 K0ᵀ = (S0 + λI)⁻¹
    betas, errors, moves = (0.02, 0.01, 0.005), [], []
    for beta in betas:
        K1 = ikfac_step(K0, U, lam, beta).to_dense()
        target = torch.linalg.inv((1 - beta) * S0 + beta * U + lam * eye)
        errors.append((K1 @ K1.T - target).norm())
        moves.append((target - K0.to_dense() @ K0.to_dense().T).norm())
    for beta, e, mv in zip(betas, errors, moves):
        assert e < 5 * beta * mv  # the O(β) change is tracked to relative O(β)
    for a, b in zip(errors, errors[1:]):
        assert 3.6 < a / b < 4.4  # the error is O(β²)


def test_ingd_fixed_point():
    d_in, d_out, lam = 5, 3, 0.1
    U_K, U_C = random_spd(d_in, 7), random_spd(d_out, 8)
    K, C = Dense().identity(d_in, F64, "cpu"), Dense().identity(d_out, F64, "cpu")
    m_K, m_C = Dense().zeros(d_in, F64, "cpu"), Dense().zeros(d_out, F64, "cpu")
    for _ in range(1500):
        K, C, m_K, m_C = ingd_step(K, C, m_K, m_C, U_K, U_C, lam, 0.1, 0.5)
    PK, PC = K.to_dense() @ K.to_dense().T, C.to_dense() @ C.to_dense().T
    expect_K = (
        torch.trace(U_C @ PC) * U_K + lam * torch.trace(PC) * torch.eye(d_in, dtype=F64)
    ) / d_out
    expect_C = (
        torch.trace(U_K @ PK) * U_C + lam * torch.trace(PK) * torch.eye(d_out, dtype=F64)
    ) / d_in
    assert R.rel_err(torch.linalg.inv(PK), expect_K) < 1e-10
    assert R.rel_err(torch.linalg.inv(PC), expect_C) < 1e-10


def test_first_step_is_ikfac_preconditioned_gradient():
    prob = build_problem("mlp_mixed_bias", "ce-mean")
    lr, lam, beta = 0.3, 0.05, 0.2
    capt = prob.capture("empirical")
    grads = capt.split(capt.grad)
    expect = {}
    for name, f in curvlab.KFAC(capt).factors.items():
        I_A, I_G = torch.eye(f.A.shape[0], dtype=F64), torch.eye(f.G.shape[0], dtype=F64)
        K = I_A - beta / 2 * (f.A + (lam - 1) * I_A)
        C = I_G - beta / 2 * (f.G + (lam - 1) * I_G)
        expect[name] = -lr * C @ C.T @ grads[name] @ K @ K.T
    model = copy.deepcopy(prob.model)
    before = capt.params_vector()
    opt = SINGD(model, prob.loss_fn, lr=lr, damping=lam, preconditioner_lr=beta)
    opt.step(prob.X, prob.y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert R.rel_err(after - before, capt.join(expect)) < 1e-12


@pytest.mark.parametrize(
    "rule, structure",
    [("ikfac", "dense"), ("ingd", Hierarchical(2, 2)), ("ingd", (BlockDiagonal(2), "diagonal"))],
)
def test_bfloat16(rule, structure):
    prob = build_problem("mlp_mixed_bias", "ce-mean", n=16, dtype=torch.bfloat16)
    model = copy.deepcopy(prob.model)
    opt = SINGD(
        model,
        prob.loss_fn,
        lr=0.1,
        update_rule=rule,
        structure=structure,
        momentum=0.5,
        weight_decay=1e-3,
    )
    losses = [opt.step(prob.X, prob.y) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    for f in opt.factors.values():
        for m in f.values():
            assert m.dtype == torch.bfloat16
            assert all(torch.isfinite(part).all() for part in m.parts)

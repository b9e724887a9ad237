"""FOOF and EKFAC against dense references built from hook records.

FOOF: per layer kron(I_{d_out}, A); solve = V (A + λI)⁻¹.
EKFAC: per layer (Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ with S = s Σ_{n,c} (Q_Gᵀ Gr_nc Q_A)²,
where Q_A, Q_G are eigenbases of the KFAC factors.  EKFAC is unique only when the
non-zero eigenvalues of A and G are simple; degenerate cases (e.g. the last layer of
an MSE network with the exact Fisher, G ∝ I) are checked through basis-free
quantities (trace, and the optimality of S) only.  Tolerance: RTOL = 1e-8.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import DAMPINGS, RTOL, get_problem, mc_generator

import curvlab


def _setup(problem, fisher):
    capt = problem.capture(fisher, generator=mc_generator(31))
    return capt, problem.ref(fisher, capt)


# ----------------------------------------------------------------------------------
# FOOF
# ----------------------------------------------------------------------------------


def test_foof(problem):
    capt, ref = _setup(problem, "exact")
    foof = curvlab.FOOF(capt)
    D = R.dense_foof(ref.records)
    spectrum = []
    for r in ref.records:
        A, _ = R.kfac_factors(r, 1.0)
        spectrum.append(torch.linalg.eigvalsh(A).repeat(r.d_out))
    errs = R.interface_errors(foof, D, DAMPINGS, spectrum=torch.cat(spectrum))
    R.assert_close_all(errs, RTOL, f"FOOF {problem}")
    assert list(foof.blocks) == [r.name for r in ref.records]
    for r, blk in zip(ref.records, foof.blocks.values()):
        R.assert_close_all(
            R.interface_errors(blk, D[r.slice, r.slice], [1e-1]), RTOL, f"FOOF block {r.name}"
        )


@pytest.mark.parametrize("loss_name", ["ce-mean"])
def test_foof_solve_is_right_multiplication(problem):
    """solve(v, λ) reshaped to [W | b] equals V (A + λI)⁻¹ layer by layer."""
    capt, ref = _setup(problem, "exact")
    foof = curvlab.FOOF(capt)
    v = R.random_vector(problem.P, seed=4)
    for lam in DAMPINGS:
        out = foof.solve(v, lam)
        for r in ref.records:
            A, _ = R.kfac_factors(r, 1.0)
            V = R.flat_to_wb(v[r.slice], r)
            expect = V @ torch.linalg.inv(A + lam * torch.eye(r.d_in_h, dtype=A.dtype))
            err = R.rel_err(R.flat_to_wb(out[r.slice], r), expect)
            assert err <= RTOL, (r.name, lam, err)


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_foof_kfac_damping_against_dense(problem, fisher):
    """Benzing's Fig. 3/4 FOOF: the same matrix A ⊗ I, solve = V (A + π√λ I)⁻¹ with KFAC's
    π = sqrt((tr A / dim A) / (tr G / dim G)) of the same A and G (dense float64)."""
    capt, ref = _setup(problem, fisher)
    foof = curvlab.FOOF(capt, damping_mode="heuristic")
    assert R.rel_err(foof.to_dense(), R.dense_foof(ref.records)) <= RTOL
    v = R.random_vector(problem.P, seed=5)
    for lam in DAMPINGS:
        out = foof.solve(v, lam)
        for r in ref.records:
            A, G = R.kfac_factors(r, ref.scale)
            pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
            damped = A + pi * lam**0.5 * torch.eye(r.d_in_h, dtype=A.dtype)
            expect = R.flat_to_wb(v[r.slice], r) @ torch.linalg.inv(damped)
            err = R.rel_err(R.flat_to_wb(out[r.slice], r), expect)
            assert err <= RTOL, (r.name, lam, err)


def test_foof_damping_mode_is_checked():
    with pytest.raises(ValueError, match="plain, heuristic"):
        curvlab.FOOF(get_problem("mlp_tanh", "ce-mean").capture("exact"), "standard")


def test_foof_independent_of_fisher_type():
    p = get_problem("conv2d_stride", "bce-mean")
    dense = [
        curvlab.FOOF(p.capture(k, generator=mc_generator(0))).to_dense()
        for k in ("exact", "empirical", "mc")
    ]
    assert R.rel_err(dense[1], dense[0]) <= RTOL
    assert R.rel_err(dense[2], dense[0]) <= RTOL


# ----------------------------------------------------------------------------------
# EKFAC
# ----------------------------------------------------------------------------------


def _simple_spectrum(M: torch.Tensor, rel_gap: float = 1e-6) -> bool:
    """True when M's non-zero eigenvalues are pairwise separated by > rel_gap·max."""
    w = torch.linalg.eigvalsh(M)
    top = w.abs().max()
    if top == 0:
        return True
    nz = w[w > 1e-10 * top]
    return nz.numel() < 2 or bool((nz.diff() > rel_gap * top).all())


def _ekfac_unique(records, scale) -> bool:
    for r in records:
        A, G = R.kfac_factors(r, scale)
        if not (_simple_spectrum(A) and _simple_spectrum(G)):
            return False
    return True


def test_ekfac(problem, fisher):
    capt, ref = _setup(problem, fisher)
    ekfac = curvlab.EKFAC(capt)
    block_exact = R.dense_exact_blocks(ref.records, ref.scale)
    # basis-free: tr(EKFAC) = Σ S = tr of the exact block-diagonal Fisher
    tr_err = float((ekfac.trace() - block_exact.trace()).abs() / block_exact.trace())
    assert tr_err <= RTOL
    if not _ekfac_unique(ref.records, ref.scale):
        pytest.skip("degenerate KFAC eigenvalues: EKFAC basis not unique (trace checked)")
    D = R.dense_ekfac(ref.records, ref.scale)
    spectrum = torch.cat([R.ekfac_parts(r, ref.scale)[2].reshape(-1) for r in ref.records])
    errs = R.interface_errors(ekfac, D, DAMPINGS, spectrum=spectrum)
    R.assert_close_all(errs, RTOL, f"EKFAC {problem} {fisher}")
    assert list(ekfac.blocks) == [r.name for r in ref.records]
    for r, blk in zip(ref.records, ekfac.blocks.values()):
        R.assert_close_all(
            R.interface_errors(blk, D[r.slice, r.slice], [1e-1]), RTOL, f"EKFAC block {r.name}"
        )


@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_ekfac_no_worse_than_kfac(problem, fisher):
    """S is the exact block's diagonal in the KFAC eigenbasis, hence the best diagonal
    there: ‖F_block − EKFAC‖_F ≤ ‖F_block − KFAC‖_F (any eigenbasis choice)."""
    capt, ref = _setup(problem, fisher)
    B = R.dense_exact_blocks(ref.records, ref.scale)
    e_ekfac = (curvlab.EKFAC(capt).to_dense() - B).norm()
    e_kfac = (curvlab.KFAC(capt).to_dense() - B).norm()
    assert e_ekfac <= e_kfac * (1 + 1e-10) + 1e-12 * B.norm()

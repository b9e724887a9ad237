"""Self-checks of tests/reference.py (no curvlab involved).

The per-layer records (hook inputs, conv patches from the weight Jacobian, output
gradients per column) and the [W | b] -> flat mapping are validated against the
Jacobian-based dense matrices, for every model including Conv1d and "same"-padded
Conv2d, which no peer library covers.  Tolerance: 1e-12 relative (pure float64
re-association of the same sums).
"""

from __future__ import annotations

import reference as R
import torch

TOL = 1e-12


def test_records_reproduce_exact_block_diagonal(problem, fisher):
    """s Σ vec(Σ_t e ā ᵀ) vec(·)ᵀ from the records = diagonal blocks of the dense Fisher."""
    if fisher == "mc":  # any columns work: use a fixed random set
        g = torch.Generator().manual_seed(0)
        cols = torch.randn(2, problem.N, 3, generator=g, dtype=torch.float64)
        F = R.dense_fisher_from_columns(problem.model, problem.X, cols, problem.scale)
        records = R.layer_records(problem.model, problem.X, cols)
    else:
        ref = problem.ref(fisher)
        F, records = ref.F, ref.records
    assert sum(r.size for r in records) == problem.P
    B = R.dense_exact_blocks(records, problem.scale)
    assert R.rel_err(B, R.block_diagonal_part(F, records)) <= TOL


def test_columns_reproduce_dense_matrices(problem):
    """The output-space columns give the GGN (exact) and the EF (empirical)."""
    for kind in ("exact", "empirical"):
        ref = problem.ref(kind)
        F = R.dense_fisher_from_columns(problem.model, problem.X, ref.columns, problem.scale)
        assert R.rel_err(F, ref.F) <= TOL, kind


def test_empirical_columns_sum_to_gradient(problem):
    """∇L = s Σ_n J_nᵀ ∇ℓ̃_n = s √c Σ_n J_nᵀ g_n for the empirical columns g."""
    ref = problem.ref("empirical")
    U = R.column_gradients(problem.model, problem.X, ref.columns)[0]
    c = R.output_scale(problem.loss_fn, ref.columns.shape[-1])
    assert R.rel_err(problem.scale * c**0.5 * U.sum(0), problem.grad()) <= TOL


def test_wb_index_roundtrip():
    for d_out, d_in, bias in [(3, 4, True), (2, 5, False), (1, 1, True)]:
        idx = R.wb_index(d_out, d_in, bias)
        assert sorted(idx.tolist()) == list(range(d_out * (d_in + bias)))
        W = torch.arange(d_out * d_in, dtype=torch.float64).reshape(d_out, d_in)
        b = 100 + torch.arange(d_out, dtype=torch.float64)
        flat = torch.cat([W.reshape(-1), b]) if bias else W.reshape(-1)
        wb = torch.cat([W, b[:, None]], 1) if bias else W
        assert torch.equal(flat[idx].reshape(wb.shape), wb)

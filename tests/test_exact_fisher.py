"""ExactFisher and BlockDiagFisher against dense float64 references.

References: ``exact`` = Jᵀ ∇²_f L J (torch.func.hessian of the loss w.r.t. the
output); ``empirical`` = per-sample gradients (vmap(grad)), curvlinops' EF
convention; ``mc`` = s Σ J_nᵀ g gᵀ J_n from the capture's own sampled columns, so
the MC Fisher is checked exactly.  Tolerance: relative error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import DAMPINGS, RTOL, build_problem, get_problem, mc_generator
from torch import nn

import curvlab


def _capture(problem, fisher, mc_samples=1):
    return problem.capture(fisher, mc_samples=mc_samples, generator=mc_generator(11))


def test_exact_fisher(problem, fisher):
    capt = _capture(problem, fisher)
    ref = problem.ref(fisher, capt)
    obj = curvlab.ExactFisher(capt)
    assert obj.num_params == problem.P
    errs = R.interface_errors(obj, ref.F, DAMPINGS)
    R.assert_close_all(errs, RTOL, f"ExactFisher {problem} {fisher}")


def test_exact_fisher_eigvalsh_count(problem, fisher):
    """ExactFisher.eigvalsh returns the N·C' eigenvalues of s·UᵀU."""
    capt = _capture(problem, fisher, mc_samples=2)
    ref = problem.ref(fisher, capt)
    eigs = curvlab.ExactFisher(capt).eigvalsh()
    assert eigs.shape == (problem.N * ref.columns.shape[0],)
    U = R.column_gradients(problem.model, problem.X, ref.columns).reshape(-1, problem.P)
    gram_eigs = torch.linalg.eigvalsh(ref.scale * U @ U.T)
    err = R.spectrum_err(eigs, gram_eigs)
    assert err <= RTOL


def test_exact_fisher_blocks(problem, fisher):
    capt = _capture(problem, fisher)
    ref = problem.ref(fisher, capt)
    blocks = curvlab.ExactFisher(capt).blocks
    assert list(blocks) == [r.name for r in ref.records]
    for r, (name, blk) in zip(ref.records, blocks.items()):
        D = ref.F[r.slice, r.slice]
        assert blk.num_params == r.size
        R.assert_close_all(R.interface_errors(blk, D, [1e-1]), RTOL, f"block {name}")


def test_block_diag_fisher(problem, fisher):
    capt = _capture(problem, fisher)
    ref = problem.ref(fisher, capt)
    obj = curvlab.BlockDiagFisher(capt)
    D = R.block_diagonal_part(ref.F, ref.records)
    R.assert_close_all(R.interface_errors(obj, D, DAMPINGS), RTOL, f"BlockDiag {problem}")
    assert list(obj.blocks) == [r.name for r in ref.records]
    for r, blk in zip(ref.records, obj.blocks.values()):
        R.assert_close_all(
            R.interface_errors(blk, ref.F[r.slice, r.slice], [1e-1]), RTOL, f"block {r.name}"
        )


@pytest.mark.parametrize("model_name", ["mlp_tanh", "seq_mean", "conv2d_same_dil"])
@pytest.mark.parametrize("fisher", ["mc"])
def test_mc_several_samples(problem, fisher):
    capt = _capture(problem, "mc", mc_samples=3)
    assert capt.columns.shape[0] == 3
    ref = problem.ref("mc", capt)
    R.assert_close_all(
        R.interface_errors(curvlab.ExactFisher(capt), ref.F, DAMPINGS), RTOL, "mc S=3"
    )
    R.assert_close_all(
        R.interface_errors(
            curvlab.BlockDiagFisher(capt), R.block_diagonal_part(ref.F, ref.records), DAMPINGS
        ),
        RTOL,
        "blockdiag mc S=3",
    )


@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum", "bce-mean"])
def test_mc_average_approaches_exact(loss_name):
    """The MC Fisher with S samples is an unbiased estimate of the GGN.

    With X_k = s Σ_n J_nᵀ h_nk h_nkᵀ J_n the single-sample estimates (h = √S · column),
    F̂ = mean_k X_k and E‖F̂ − F‖² = E‖X − F‖² / S.  We estimate E‖X − F‖² by the
    sample variance v̂ and require ‖F̂ − F‖_F ≤ 4 √(v̂ / S) (by Markov's inequality a
    correct sampler violates this with probability ≤ 1/16, by the CLT far less; the
    seed is fixed, so the test is deterministic).  Also ‖F̂ − F‖ / ‖F‖ ≤ 0.1.
    """
    S = 1000
    p = get_problem("mlp_tanh", loss_name)
    capt = p.capture("mc", mc_samples=S, generator=mc_generator(5))
    F_hat = curvlab.ExactFisher(capt).to_dense()
    U = R.column_gradients(p.model, p.X, capt.columns * S**0.5)  # (S, N, P)
    X = p.scale * torch.einsum("knp,knq->kpq", U, U)
    v_hat = (X - X.mean(0)).square().sum(dim=(1, 2)).sum() / (S - 1)
    F = p.ggn()
    err = (F_hat - F).norm()
    bound = 4 * (v_hat / S).sqrt()
    assert err <= bound, f"‖F̂ − F‖ = {err:.3e} > 4σ = {bound:.3e}"
    assert err / F.norm() <= 0.1
    # and the estimate used by curvlab is the one built from its columns
    assert R.rel_err(F_hat, X.mean(0)) <= RTOL


def test_solve_undamped_nonsingular():
    """solve(v, 0) = F⁻¹ v when F is non-singular (P ≤ N·C' and full rank)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    F = R.dense_ggn(model, loss_fn, X, y)
    v = R.random_vector(15)
    for obj in (curvlab.ExactFisher(capt), curvlab.BlockDiagFisher(capt)):
        err = R.rel_err(obj.solve(v, 0.0), torch.linalg.solve(F, v))
        assert err <= RTOL, type(obj).__name__


def test_scale_mean_vs_sum():
    """F(sum) = N·F(mean) for CE and N·C·F(mean) for MSE/BCE (curvlinops' scale)."""
    for kind, factor in [("ce", 6), ("mse", 18), ("bce", 18)]:
        p_mean = build_problem("mlp_tanh", f"{kind}-mean")
        p_sum = build_problem("mlp_tanh", f"{kind}-sum")
        F_mean = curvlab.ExactFisher(p_mean.capture("exact")).to_dense()
        F_sum = curvlab.ExactFisher(p_sum.capture("exact")).to_dense()
        err = R.rel_err(F_sum, factor * F_mean)
        assert err <= RTOL, kind


@pytest.mark.parametrize("scheme", ["pairs", "per_sample"])
@pytest.mark.parametrize("model_name", ["seq_flatten", "conv1d", "conv2d_nobias"])
@pytest.mark.parametrize("loss_name", ["ce-mean"])
def test_gram_schemes_agree(problem, scheme):
    """Both exact Gram schemes for T > 1 layers give the same Fisher (optional knob)."""
    capt = problem.capture("exact")
    try:
        obj = curvlab.ExactFisher(capt, scheme=scheme)
    except TypeError:
        pytest.skip("ExactFisher has no `scheme` argument")
    R.assert_close_all(R.interface_errors(obj, problem.ggn(), DAMPINGS), RTOL, scheme)


def _natural_gradient_ref(F: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.linalg.solve(F + damping * torch.eye(F.shape[0], dtype=F.dtype), g)


def test_natural_gradient(problem, fisher):
    """natural_gradient(λ) = (F + λI)⁻¹ g from a capture without the flat gradient."""
    capt = problem.capture(fisher, generator=mc_generator(11), gradient=False)
    ref = problem.ref(fisher, capt)
    obj = curvlab.ExactFisher(capt)
    for lam in DAMPINGS:
        ng = obj.natural_gradient(lam)
        err = R.rel_err(ng, _natural_gradient_ref(ref.F, problem.grad(), lam))
        assert err <= RTOL, f"{problem} {fisher} λ={lam}"


def _uses_gram_branch(n: int, c: int, lc) -> bool:
    """The branch condition of GramFisher.natural_gradient for ``Uᵀg``."""
    t, d_in, d_out = lc.a.shape[1], lc.a.shape[2], lc.e.shape[-1]
    return (n * t) ** 2 * (d_in + c * d_out) < 2 * n * t * d_in * d_out


@pytest.mark.parametrize(
    ("name", "n"),
    [("wide_mlp", 2), ("wide_mlp", 40), ("wide_conv", 2), ("wide_conv", 40)],
)
def test_natural_gradient_both_branches(name, n):
    """Both ways of forming ``Uᵀg`` from an assembled Gram (sample-pair products for
    small N, the layer gradient otherwise) and the joint assembly of a fresh object
    agree with the dense reference, for Linear and conv layers."""
    torch.manual_seed(7)
    if name == "wide_mlp":
        model = nn.Sequential(nn.Linear(24, 30), nn.Tanh(), nn.Linear(30, 3)).double()
        X = torch.randn(n, 24, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
        model = model.double()
        X = torch.randn(n, 8, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact", gradient=False)
    branches = {_uses_gram_branch(n, capt.num_columns, lc) for lc in capt.layers}
    assert branches == ({True} if n == 2 else {False})
    F = R.dense_ggn(model, loss_fn, X, y)
    g = R.batch_gradient(model, loss_fn, X, y)
    expect = _natural_gradient_ref(F, g, 1e-2)
    assembled = curvlab.ExactFisher(capt)
    assembled.gram  # noqa: B018 (assemble K first: Uᵀg then comes from the branches)
    for obj, how in [(assembled, "from the Gram"), (curvlab.ExactFisher(capt), "joint")]:
        assert R.rel_err(obj.natural_gradient(1e-2), expect) <= RTOL, how


@pytest.mark.parametrize("chunk_bytes", [1, 128 * 2**20])
@pytest.mark.parametrize("scheme", ["pairs", "per_sample"])
@pytest.mark.parametrize("model_name", ["mlp_mixed_bias", "seq_flatten", "conv2d_stride"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_chunked_assembly(monkeypatch, model_name, fisher, scheme, chunk_bytes):
    """Gram assembly (alone, and jointly with ``Uᵀg``) one sample per chunk equals the
    unchunked result and the dense references, for both schemes, C' = 1 and C' = C."""
    from curvlab.config import options

    monkeypatch.setattr(options, "chunk_bytes", chunk_bytes)
    p = get_problem(model_name, "ce-mean")
    capt = p.capture(fisher, generator=mc_generator(3), gradient=False)
    ref = p.ref(fisher, capt)
    joint = curvlab.ExactFisher(capt, scheme=scheme)
    ng = joint.natural_gradient(0.1)
    assert R.rel_err(ng, _natural_gradient_ref(ref.F, p.grad(), 0.1)) <= RTOL
    alone = curvlab.ExactFisher(capt, scheme=scheme)
    assert R.rel_err(joint.gram, alone.gram) <= RTOL
    R.assert_close_all(R.interface_errors(alone, ref.F, DAMPINGS), RTOL, str(p))


def test_natural_gradient_blocks_and_fallback():
    """Per-layer blocks give their block's direction; a capture without gradient rows
    falls back to solve(capture.grad, λ); λ = 0 is refused."""
    from dataclasses import replace

    from curvlab.errors import SingularMatrixError

    p = get_problem("mlp_mixed_bias", "mse-mean")
    capt = p.capture("exact")
    ref = p.ref("exact", capt)
    g = p.grad()
    for r, blk in zip(ref.records, curvlab.ExactFisher(capt).blocks.values()):
        expect = _natural_gradient_ref(ref.F[r.slice, r.slice], g[r.slice], 0.1)
        assert R.rel_err(blk.natural_gradient(0.1), expect) <= RTOL, r.name
    block_diag = R.block_diagonal_part(ref.F, ref.records)
    ng = curvlab.BlockDiagFisher(capt).natural_gradient(0.1)
    assert R.rel_err(ng, _natural_gradient_ref(block_diag, g, 0.1)) <= RTOL
    bare = replace(capt, layers=[replace(lc, g=None) for lc in capt.layers])
    ng = curvlab.ExactFisher(bare).natural_gradient(0.1)
    assert R.rel_err(ng, _natural_gradient_ref(ref.F, g, 0.1)) <= RTOL
    with pytest.raises(SingularMatrixError):
        curvlab.ExactFisher(capt).natural_gradient(0.0)
    with pytest.raises(ValueError, match="neither"):
        curvlab.ExactFisher(replace(bare, grad=None)).natural_gradient(0.1)


def test_exact_blocks_shared_across_objects():
    """A layer's exact block is one object for ExactFisher, BlockDiagFisher and the
    exact blocks KFAC/EKFAC/FOOF keep for layers without Kronecker factors (its Gram is
    assembled once), only while some object holds it, and never across captures."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y, "exact")
    objs = [
        curvlab.ExactFisher(capt),
        curvlab.BlockDiagFisher(capt),
        curvlab.KFAC(capt),
        curvlab.EKFAC(capt),
        curvlab.FOOF(capt),
    ]
    norm = {id(obj.blocks["1"]) for obj in objs}
    assert len(norm) == 1
    assert objs[2].blocks["0"] is not objs[1].blocks["0"]  # a Kronecker layer's KFAC block
    other = curvlab.capture(model, nn.CrossEntropyLoss(), X, y, "exact")
    assert curvlab.BlockDiagFisher(other).blocks["1"] is not objs[1].blocks["1"]
    del objs
    gc.collect()
    assert len(capt.exact_blocks) == 0

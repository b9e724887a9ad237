"""Comparison metrics against dense float64 references on tiny networks.

Every metric of ``curvlab.compare`` (cosines, relative Frobenius errors, spectra,
top-k eigenspace overlap, damping cross terms and step sizes) is recomputed here from
dense ``P x P`` matrices built by ``tests/reference.py`` (torch.func Jacobians and
hook records, no curvlab code), and must agree to RTOL = 1e-8.
"""

from __future__ import annotations

import math

import pytest
import reference as R
import torch
from conftest import RTOL, get_problem

from curvlab.compare import Analysis, cosine_records, nonzero_spectrum, relative_errors
from curvlab.compare.damping import damping_records
from curvlab.compare.spectra import overlap, overlap_records, spectrum_records, top_eigenvectors
from curvlab.records import NETWORK

CASES = [("mlp_tanh", "ce-mean"), ("conv2d_stride", "ce-sum"), ("seq_mean", "mse-mean")]
LAM = 0.1


def _setup(model_name: str, loss_name: str):
    problem = get_problem(model_name, loss_name)
    analysis = Analysis(problem.model, problem.loss_fn, problem.X, problem.y, "exact")
    ref = problem.ref("exact")
    return problem, analysis, ref


def _dense(problem, ref) -> dict[str, torch.Tensor]:
    """Dense matrices of every compared method (flat layout)."""
    F = problem.ggn()
    return {
        "exact": F,
        "blockdiag": R.block_diagonal_part(F, ref.records),
        "kfac": R.dense_kfac(ref.records, ref.scale),
        "foof": R.dense_foof(ref.records),
        "ekfac": R.dense_ekfac(ref.records, ref.scale),
    }


def _dense_directions(problem, ref, lam: float) -> dict[str, torch.Tensor]:
    D = _dense(problem, ref)
    g = problem.grad()
    eye = torch.eye(problem.P, dtype=torch.float64)
    out = {m: torch.linalg.solve(D[m] + lam * eye, g) for m in ("exact", "blockdiag", "foof")}
    heuristic = torch.block_diag(*[R.kfac_heuristic_dense(r, ref.scale, lam) for r in ref.records])
    out["kfac"] = torch.linalg.solve(heuristic, g)
    blocks = []
    for r in ref.records:  # FOOF with KFAC's A-side damping: kron(I, A + π√λ I)
        A, G = R.kfac_factors(r, ref.scale)
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        damped = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=A.dtype)
        blocks.append(R.wb_to_flat(torch.kron(torch.eye(r.d_out, dtype=A.dtype), damped), r))
    out["foof-kfac-damping"] = torch.linalg.solve(torch.block_diag(*blocks), g)
    out["sgd"] = g
    return out


def _cos(x, y, M=None):
    M = torch.eye(x.numel(), dtype=x.dtype) if M is None else M
    return float(x @ M @ y / torch.sqrt((x @ M @ x) * (y @ M @ y)))


@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_cosines_match_dense(model_name, loss_name):
    problem, analysis, ref = _setup(model_name, loss_name)
    methods = ["exact", "blockdiag", "kfac", "foof", "sgd"]
    records = cosine_records(analysis, methods, [LAM], inner_products=["foof", "exact"])
    dirs = _dense_directions(problem, ref, LAM)
    D = _dense(problem, ref)
    slices = {NETWORK: slice(None), **{r.name: r.slice for r in ref.records}}
    assert len(records) == len(slices) * 3 * len(methods) * (len(methods) - 1)
    for rec in records:
        s = slices[rec.layer]
        inner = rec.metric.removeprefix("cosine").removeprefix("_") or None
        M = None if inner is None else D[inner][s, s]
        expect = _cos(dirs[rec.method][s], dirs[rec.reference][s], M)
        assert abs(rec.value - expect) <= RTOL, (rec, expect)


@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_relative_errors_match_dense(model_name, loss_name):
    problem, analysis, ref = _setup(model_name, loss_name)
    D = _dense(problem, ref)
    F = D["exact"]
    slices = {r.name: r.slice for r in ref.records}
    for method in ("exact", "blockdiag", "kfac", "foof", "ekfac"):
        got = relative_errors(analysis, method)
        C = D[method]
        expect = {NETWORK: (C - F).norm() / F.norm()}
        cos = {NETWORK: (C * F).sum() / (C.norm() * F.norm())}
        for name, s in slices.items():
            expect[name] = (C[s, s] - F[s, s]).norm() / F[s, s].norm()
            cos[name] = (C[s, s] * F[s, s]).sum() / (C[s, s].norm() * F[s, s].norm())
        assert list(got) == [*slices, NETWORK]
        for layer, (err, fcos) in got.items():
            assert abs(err - float(expect[layer])) <= 1e-7 * max(1.0, float(expect[layer]))
            assert abs(fcos - float(cos[layer])) <= RTOL, (method, layer)


def test_blockdiag_network_error_is_the_off_diagonal_mass():
    problem, analysis, ref = _setup("mlp_tanh", "ce-mean")
    F = problem.ggn()
    off = F - R.block_diagonal_part(F, ref.records)
    err, _ = relative_errors(analysis, "blockdiag")[NETWORK]
    assert err > 0.05
    assert abs(err - float(off.norm() / F.norm())) <= RTOL


def _nonzero_desc(M: torch.Tensor) -> torch.Tensor:
    values = torch.linalg.eigvalsh(M).flip(0)
    return values[values > 1e-10 * values[0]]


@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_spectra_match_dense(model_name, loss_name):
    problem, analysis, ref = _setup(model_name, loss_name)
    D = _dense(problem, ref)
    for method in ("exact", "blockdiag", "kfac", "ekfac"):
        got = nonzero_spectrum(analysis, analysis.curvature(method))
        expect = _nonzero_desc(D[method])
        assert got.shape == expect.shape, method
        assert float((got - expect).abs().max() / expect[0]) <= RTOL, method
    records = spectrum_records(analysis, ["exact", "kfac", "sgd"], per_layer=True)
    exact_net = [r.value for r in records if r.method == "exact" and r.layer == NETWORK]
    assert [r.index for r in records if r.method == "exact" and r.layer == NETWORK] == list(
        range(len(exact_net))
    )
    assert exact_net == sorted(exact_net, reverse=True)
    assert {r.method for r in records} == {"exact", "kfac"}  # sgd has no curvature
    for r in ref.records:
        layer_vals = [x.value for x in records if x.method == "exact" and x.layer == r.name]
        expect = _nonzero_desc(D["exact"][r.slice, r.slice])
        assert torch.allclose(
            torch.tensor(layer_vals, dtype=expect.dtype), expect, rtol=1e-8, atol=1e-12 * expect[0]
        )


def test_max_eigenvalues_keeps_the_largest():
    _, analysis, _ = _setup("mlp_tanh", "ce-mean")
    full = spectrum_records(analysis, ["kfac"], per_layer=False)
    cut = spectrum_records(analysis, ["kfac"], per_layer=False, max_eigenvalues=5)
    assert [r.value for r in cut] == [r.value for r in full][:5]
    assert cut[0].extra["num_nonzero"] == len(full)


def _projector(M: torch.Tensor, k: int) -> torch.Tensor:
    """Basis-free top-``k`` eigenspace projector of a dense PSD matrix: eigenvectors above
    the ``k``-th eigenvalue count fully, the ``m`` tied with it ``r / m`` each."""
    values, vectors = torch.linalg.eigh(M)
    values, vectors = values.flip(0), vectors.flip(1)
    tol = 1e-9 * values[0]
    above = values > values[k - 1] + tol
    tied = (values - values[k - 1]).abs() <= tol
    weights = above.double() + tied.double() * (k - int(above.sum())) / int(tied.sum())
    return (vectors * weights) @ vectors.T


@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_top_eigenspace_overlap_matches_dense(model_name, loss_name):
    """Including FOOF, whose eigenvalues repeat d_out times (tie-weighted projectors)."""
    problem, analysis, ref = _setup(model_name, loss_name)
    D = _dense(problem, ref)
    k = 4
    values, x = top_eigenvectors(analysis, analysis.exact, k)
    expect_values = torch.linalg.eigvalsh(D["exact"]).flip(0)[: values.numel()]
    assert torch.allclose(values, expect_values, rtol=1e-9)
    assert torch.allclose(x.T @ D["exact"] @ x, torch.diag(values), atol=1e-9 * values[0])
    methods = ["exact", "blockdiag", "kfac", "foof", "ekfac"]
    records = overlap_records(analysis, methods, top_k=k)
    slices = {NETWORK: slice(None), **{r.name: r.slice for r in ref.records}}
    assert {(r.method, r.layer) for r in records} == {
        *((m, NETWORK) for m in ("blockdiag", "kfac", "foof", "ekfac")),
        *((m, r.name) for m in ("kfac", "foof", "ekfac") for r in ref.records),
    }
    for rec in records:
        s = slices[rec.layer]
        px = _projector(D["exact"][s, s], rec.index)
        pw = _projector(D[rec.method][s, s], rec.index)
        expect = float((px * pw).sum() / rec.index)
        assert abs(rec.value - expect) <= 1e-7, rec


def test_overlap_of_a_subspace_with_itself_is_one():
    q, _ = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))
    values = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(overlap(values, values, q.T @ q, 5), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(
        overlap(values[:2], values[:2], q[:, :2].T @ q[:, 2:4], 2),
        torch.zeros(2, dtype=torch.float64),
    )


@pytest.mark.parametrize("foof", [None, "foof"])
def test_damping_records_match_dense(foof):
    """Default: the KFAC-vs-FOOF cosines use FOOF with KFAC's damping (Benzing, Fig. 3B)."""
    problem, analysis, ref = _setup("mlp_tanh", "ce-mean")
    grid = [1e-2, 1.0]
    methods = ["exact", "kfac", "kfac-standard", "foof", "sgd"]
    if foof is None:
        records, foof = damping_records(analysis, methods, grid), "foof-kfac-damping"
    else:
        records = damping_records(analysis, methods, grid, foof=foof)
    assert {r.reference for r in records if r.metric == "cosine_foof"} == {foof}
    D = _dense(problem, ref)
    g = problem.grad()
    for lam in grid:
        dirs = _dense_directions(problem, ref, lam)
        eye = torch.eye(problem.P, dtype=torch.float64)
        dirs["kfac-standard"] = torch.linalg.solve(D["kfac"] + lam * eye, g)
        at = [r for r in records if r.damping == lam]
        for r in at:
            if r.metric == "cosine" and r.reference == "exact":
                assert abs(r.value - _cos(dirs[r.method], dirs["exact"])) <= RTOL
            elif r.metric in ("cosine", "cosine_foof"):
                assert r.reference == foof and r.method in ("kfac", "kfac-standard")
                M = D["foof"] if r.metric == "cosine_foof" else None
                assert abs(r.value - _cos(dirs[r.method], dirs[foof], M)) <= RTOL
            elif r.metric == "effective_step_size":
                s = (
                    slice(None)
                    if r.layer == NETWORK
                    else ref.records[analysis.layer_names.index(r.layer)].slice
                )
                expect = float(dirs[r.method][s].norm() / g[s].norm())
                assert abs(r.value - expect) <= RTOL * expect
        cross = [r for r in at if r.metric == "cross_terms_ratio"]
        assert {r.method for r in cross} == {"kfac"}  # standard damping adds no cross terms
        total = 0.0
        for rec in ref.records:
            A, G = R.kfac_factors(rec, ref.scale)
            pi = math.sqrt(float((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])))
            IA, IG = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
            term = pi * math.sqrt(lam) * torch.kron(G, IA) + math.sqrt(lam) / pi * torch.kron(IG, A)
            total += float(term.norm()) ** 2
            got = next(r.value for r in cross if r.layer == rec.name)
            expect = float(term.norm()) / (lam * math.sqrt(rec.size))
            assert abs(got - expect) <= RTOL * expect
        got = next(r.value for r in cross if r.layer == NETWORK)
        assert abs(got - math.sqrt(total) / (lam * math.sqrt(problem.P))) <= RTOL * got
    sgd = [r.value for r in records if r.method == "sgd" and r.metric == "effective_step_size"]
    assert all(abs(v - 1.0) <= 1e-12 for v in sgd)

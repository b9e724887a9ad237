"""KFC assumption checks against brute-force dense references.

References are built with explicit loops over location pairs (``kron`` per pair) from
the hook records of ``tests/reference.py``; the exact block is also checked against
the dense GGN.  Constructed cases where the approximations are exact (all-ones
inputs with spatially constant derivatives; spatially uncorrelated derivatives)
pin down IAD, SH and SUD separately.
"""

from __future__ import annotations

import itertools

import pytest
import reference as R
import torch
from conftest import RTOL, get_problem

from curvlab.compare import Analysis, kfc_check_records, kfc_errors, kfc_matrices
from curvlab.compare.errors import relative_errors
from curvlab.compare.kfc_checks import (
    kept_sizes,
    offset_index,
    spatial_correlation,
)

CONV_CASES = [("conv2d_stride", "ce-mean", (3, 3)), ("conv1d", "mse-sum", (8,))]


def conv_output_shapes(model, inputs, names) -> dict[str, tuple]:
    """Spatial output shape of each named conv module, read by a forward hook."""
    modules = dict(model.named_modules())
    shapes = {}
    handles = [
        modules[name].register_forward_hook(
            lambda m, args, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    return shapes


def _coords(shape):
    return list(itertools.product(*[range(s) for s in shape]))


def brute_force(a, e, scale, shape) -> dict[str, torch.Tensor]:
    """Exact, IAD, IAD+SH and KFC blocks by loops over location pairs."""
    n, t, d = a.shape
    coords = _coords(shape)
    abar = torch.einsum("ntj,nul->tujl", a, a) / n
    ebar = scale * torch.einsum("cnti,cnuk->tuik", e, e)
    offsets: dict[tuple, list] = {}
    for i, j in itertools.product(range(t), repeat=2):
        delta = tuple(q - p for p, q in zip(coords[i], coords[j]))
        offsets.setdefault(delta, []).append((i, j))
    omega = {k: sum(abar[i, j] for i, j in v) / len(v) for k, v in offsets.items()}
    gamma = {k: sum(ebar[i, j] for i, j in v) / len(v) for k, v in offsets.items()}
    iad = sum(torch.kron(ebar[i, j], abar[i, j]) for i, j in itertools.product(range(t), repeat=2))
    sh = sum(torch.kron(gamma[k], omega[k]) * len(v) for k, v in offsets.items())
    zero = tuple(0 for _ in shape)
    grads = torch.einsum("cnto,ntj->cnoj", e, a).reshape(-1, e.shape[-1] * d)
    return {
        "exact": scale * grads.T @ grads,
        "iad": iad,
        "iad_sh": sh,
        "kfc": t * torch.kron(gamma[zero], omega[zero]),
    }


@pytest.mark.parametrize("model_name,loss_name,shape", CONV_CASES)
def test_kfc_matrices_match_brute_force(model_name, loss_name, shape):
    problem = get_problem(model_name, loss_name)
    ref = problem.ref("exact")
    F = problem.ggn()
    rec = ref.records[0]
    got = kfc_matrices(rec.a, rec.e, ref.scale, shape)
    expect = brute_force(rec.a, rec.e, ref.scale, shape)
    for key in ("exact", "iad", "iad_sh", "kfc"):
        assert R.rel_err(got[key], expect[key]) <= RTOL, key
    idx = R.wb_index(rec.d_out, rec.d_in, rec.has_bias)
    block = F[rec.slice, rec.slice][idx][:, idx]
    assert R.rel_err(got["exact"], block) <= RTOL
    A, G = R.kfac_factors(rec, ref.scale)
    assert R.rel_err(got["kfc"], torch.kron(G, A)) <= RTOL


@pytest.mark.parametrize("model_name,loss_name,shape", CONV_CASES)
def test_kfc_error_records(model_name, loss_name, shape):
    """Records equal the brute-force errors; the KFC error is KFAC's layer error."""
    problem = get_problem(model_name, loss_name)
    ref = problem.ref("exact")
    analysis = Analysis(problem.model, problem.loss_fn, problem.X, problem.y, "exact")
    records = kfc_check_records(analysis)
    conv_names = [r.name for r in ref.records if r.name in {x.layer for x in records}]
    assert conv_names, "no conv layer checked"
    kfac_errors = relative_errors(analysis, "kfac")
    for rec in ref.records:
        if rec.name not in conv_names:
            continue
        shapes = conv_output_shapes(problem.model, problem.X, [rec.name])
        assert (
            analysis.capture.layers[
                [lc.name for lc in analysis.capture.layers].index(rec.name)
            ].locations
            == shapes[rec.name]
        )
        mats = brute_force(rec.a, rec.e, ref.scale, shapes[rec.name])
        for metric in ("iad", "iad_sh", "kfc"):
            got = next(r for r in records if r.layer == rec.name and r.metric == metric)
            expect = float((mats["exact"] - mats[metric]).norm() / mats["exact"].norm())
            assert abs(got.value - expect) <= RTOL * max(1.0, expect), (rec.name, metric)
            assert got.method == "kfc" and got.reference == "exact"
            assert got.extra == {"block_params": rec.size, "subsampled": False}
        kfc = next(r.value for r in records if r.layer == rec.name and r.metric == "kfc")
        assert abs(kfc - kfac_errors[rec.name][0]) <= 1e-7
        for metric in ("corr_activations", "corr_derivatives"):
            corr = [r for r in records if r.layer == rec.name and r.metric == metric]
            assert [r.index for r in corr] == list(range(len(corr)))
            assert abs(corr[0].value - 1.0) <= 1e-12


def test_no_conv_layers_no_records():
    problem = get_problem("mlp_tanh", "ce-mean")
    analysis = Analysis(problem.model, problem.loss_fn, problem.X, problem.y, "exact")
    assert kfc_check_records(analysis) == []


def test_all_ones_inputs_and_spatially_constant_derivatives():
    """IAD and IAD+SH are exact; KFC (SUD) misses the T² - T off-diagonal location pairs."""
    gen = torch.Generator().manual_seed(0)
    n, shape, d, o, c = 5, (3, 4), 6, 4, 2
    t = 12
    a = torch.ones(n, t, d, dtype=torch.float64)
    e = torch.randn(c, n, 1, o, generator=gen, dtype=torch.float64).expand(c, n, t, o)
    errs = kfc_errors(a, e, 0.5, shape)
    assert errs["iad"] <= RTOL and errs["iad_sh"] <= RTOL
    assert abs(errs["kfc"] - (1 - 1 / t)) <= RTOL


def test_spatially_uncorrelated_derivatives_make_kfc_exact():
    """N = T samples, sample n's derivative lives at location n only: IAD, SH and SUD hold."""
    gen = torch.Generator().manual_seed(1)
    shape, d, o, c = (2, 3), 5, 3, 2
    t = n = 6
    a = torch.ones(n, t, d, dtype=torch.float64)
    v = torch.randn(c, 1, o, generator=gen, dtype=torch.float64)
    e = torch.zeros(c, n, t, o, dtype=torch.float64)
    for i in range(n):
        e[:, i, i] = v[:, 0]
    errs = kfc_errors(a, e, 1.0, shape)
    assert max(errs.values()) <= RTOL, errs


def test_random_derivatives_break_the_assumptions():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    e = torch.randn(2, 4, 6, 2, generator=gen, dtype=torch.float64)
    errs = kfc_errors(a, e, 1.0, (2, 3))
    assert all(v > 0.05 for v in errs.values()), errs


def test_subsampling_checks_a_principal_submatrix():
    problem = get_problem("conv2d_stride", "ce-mean")
    ref = problem.ref("exact")
    rec = ref.records[0]
    analysis = Analysis(problem.model, problem.loss_fn, problem.X, problem.y, "exact")
    records = kfc_check_records(analysis, max_params=8)
    errs = {r.metric: r for r in records if r.layer == rec.name and r.index is None}
    keep_o, keep_d = kept_sizes(rec.d_out, rec.d_in_h, 9, 8, 4e9)
    assert errs["kfc"].extra == {"block_params": keep_o * keep_d, "subsampled": True}
    rows = torch.linspace(0, rec.d_out - 1, keep_o).round().long()
    cols = torch.linspace(0, rec.d_in_h - 1, keep_d).round().long()
    full = brute_force(rec.a, rec.e, ref.scale, (3, 3))
    index = (rows[:, None] * rec.d_in_h + cols[None, :]).reshape(-1)
    sub = {k: m[index][:, index] for k, m in full.items()}
    for metric in ("iad", "iad_sh", "kfc"):
        expect = float((sub["exact"] - sub[metric]).norm() / sub["exact"].norm())
        assert abs(errs[metric].value - expect) <= RTOL * max(1.0, expect)


@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_spatial_correlation_matches_pair_loops(shape):
    gen = torch.Generator().manual_seed(3)
    t = 1
    for s in shape:
        t *= s
    x = torch.randn(7, t, 3, generator=gen, dtype=torch.float64)
    x = x + 0.7 * x.roll(1, dims=1)  # some spatial correlation
    got = spatial_correlation(x, shape)
    coords = _coords(shape)
    sums: dict[int, list] = {}
    for i, j in itertools.product(range(t), repeat=2):
        r = max(abs(p - q) for p, q in zip(coords[i], coords[j]))
        sums.setdefault(r, []).append(float((x[:, i] * x[:, j]).sum()))
    base = sum(sums[0]) / t
    expect = torch.tensor(
        [sum(sums[r]) / len(sums[r]) / base for r in sorted(sums)], dtype=torch.float64
    )
    assert torch.allclose(got, expect.to(got.dtype), rtol=1e-10, atol=1e-12)


def test_offset_index_counts_pairs():
    index, counts, distance = offset_index((3, 4))
    assert index.shape == (12, 12) and int(counts.sum()) == 144
    zero = (counts.numel() - 1) // 2
    assert int(counts[zero]) == 12 and int(distance[zero]) == 0
    assert bool((index.diagonal() == zero).all())
    assert int(distance.max()) == 3

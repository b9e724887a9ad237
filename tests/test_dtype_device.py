"""float32 models vs the same problem in float64, and CUDA vs CPU.

float32: results come back in float32 and agree with the float64 computation of the
same (float32-rounded) weights and data to relative error ≤ 1e-4.  Solves use λ ∈
{0.1, 10} (a float32 Gram/factor carries relative error ~1e-7, amplified by the
damped condition number, which stays ≲ 1e2 for these λ on these problems).
CUDA: same float64 problem on the GPU, relative error ≤ 1e-8 (skipped without CUDA).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import reference as R
import torch
from conftest import build_problem, mc_generator

import curvlab

F32_RTOL = 1e-4
OBJECTS = {
    "ExactFisher": curvlab.ExactFisher,
    "BlockDiagFisher": curvlab.BlockDiagFisher,
    "KFAC-standard": lambda c: curvlab.KFAC(c, damping_mode="standard"),
    "KFAC-heuristic": lambda c: curvlab.KFAC(c, damping_mode="heuristic"),
    "FOOF": curvlab.FOOF,
    "EKFAC": curvlab.EKFAC,
}
F32_MODELS = ["mlp_tanh", "seq_mean", "conv1d", "conv2d_same_dil"]
F32_LOSSES = ["ce-mean", "mse-sum", "bce-mean"]


def _as(problem, dtype, device="cpu"):
    model = copy.deepcopy(problem.model).to(device=device, dtype=dtype)
    X = problem.X.to(device=device, dtype=dtype)
    y = (
        problem.y.to(device=device, dtype=dtype)
        if problem.y.is_floating_point()
        else (problem.y.to(device))
    )
    return model, X, y


def _compare(o32, o64, v, rtol, dtype):
    errs = {}
    for k, (a, b) in {
        "to_dense": (o32.to_dense(), o64.to_dense()),
        "mv": (o32.mv(v.to(dtype)), o64.mv(v)),
        "solve(0.1)": (o32.solve(v.to(dtype), 0.1), o64.solve(v, 0.1)),
        "solve(10)": (o32.solve(v.to(dtype), 10.0), o64.solve(v, 10.0)),
        "trace": (o32.trace(), o64.trace()),
        "frobenius_norm": (o32.frobenius_norm(), o64.frobenius_norm()),
    }.items():
        assert a.dtype == dtype, (k, a.dtype)
        errs[k] = R.rel_err(a.cpu(), b.cpu())
    errs["eigvalsh"] = R.spectrum_err(o32.eigvalsh().cpu(), o64.eigvalsh().cpu())
    R.assert_close_all(errs, rtol)


@pytest.mark.parametrize("model_name", F32_MODELS)
@pytest.mark.parametrize("loss_name", F32_LOSSES)
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_float32_matches_float64(model_name, loss_name, fisher):
    p32 = build_problem(model_name, loss_name, dtype=torch.float32)
    m64, X64, y64 = _as(p32, torch.float64)
    c32 = curvlab.capture(
        p32.model, p32.loss_fn, p32.X, p32.y, fisher=fisher, generator=mc_generator(1)
    )
    c64 = curvlab.capture(m64, p32.loss_fn, X64, y64, fisher=fisher, generator=mc_generator(1))
    assert c32.grad.dtype == torch.float32
    assert R.rel_err(c32.grad, c64.grad) <= F32_RTOL
    if fisher == "mc":  # identical draws are needed for a like-for-like comparison
        if not torch.allclose(c32.columns.double(), c64.columns, rtol=1e-4, atol=1e-6):
            pytest.skip("float32/float64 MC draws differ (sampling in the model dtype)")
    v = R.random_vector(c64.num_params, seed=2)
    failures = {}
    for name, make in OBJECTS.items():  # check every object, then report all failures
        try:
            _compare(make(c32), make(c64), v, F32_RTOL, torch.float32)
        except Exception as err:  # noqa: BLE001
            failures[name] = f"{type(err).__name__}: {err}"
    assert not failures, failures


def cuda(fn):
    """Mark a test as needing CUDA (pyproject marker) and skip it without a device."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")(fn)
    return pytest.mark.cuda(fn)


@cuda
@pytest.mark.parametrize("model_name", ["mlp_tanh", "conv2d_stride", "seq_flatten"])
@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum", "bce-mean"])
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_cuda_matches_cpu(model_name, loss_name, fisher):
    p = build_problem(model_name, loss_name)
    mg, Xg, yg = _as(p, torch.float64, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    cg = curvlab.capture(mg, p.loss_fn, Xg, yg, fisher=fisher, generator=gen)
    assert cg.grad.device.type == "cuda"
    assert all(lc.a.device.type == "cuda" and lc.e.device.type == "cuda" for lc in cg.layers)
    assert R.rel_err(cg.grad.cpu(), p.grad()) <= 1e-8
    # CPU reference built from the GPU capture's own columns (exact for every kind)
    ref = p.ref("mc", SimpleNamespace(columns=cg.columns.cpu()))
    v = R.random_vector(p.P, seed=6)
    K = R.dense_kfac(ref.records, ref.scale)
    dense = {
        "ExactFisher": (ref.F, None),
        "BlockDiagFisher": (R.block_diagonal_part(ref.F, ref.records), None),
        "KFAC-standard": (K, None),
        "KFAC-heuristic": (
            K,
            lambda lam: torch.block_diag(
                *[R.kfac_heuristic_dense(r, ref.scale, lam) for r in ref.records]
            ),
        ),
        "FOOF": (R.dense_foof(ref.records), None),
        "EKFAC": (R.dense_ekfac(ref.records, ref.scale), None),
    }
    unique = all(_simple(M) for r in ref.records for M in R.kfac_factors(r, ref.scale))
    failures = {}
    for name, make in OBJECTS.items():  # check every object, then report all failures
        if name == "EKFAC" and not unique:
            continue
        try:
            obj = make(cg)
            assert obj.mv(v.cuda()).device.type == "cuda"
            assert obj.solve(v.cuda(), 0.1).device.type == "cuda"
            D, damped = dense[name]
            spectrum = None
            if name.startswith("KFAC"):
                spectrum = torch.linalg.eigvalsh(K)
            errs = R.interface_errors(obj, D, [1e-3, 1e-1, 10.0], damped=damped, spectrum=spectrum)
            R.assert_close_all(errs, 1e-8, name)
        except Exception as err:  # noqa: BLE001
            failures[name] = f"{type(err).__name__}: {err}"
    assert not failures, failures


def _simple(M, rel_gap=1e-6):
    w = torch.linalg.eigvalsh(M)
    nz = w[w > 1e-10 * w.abs().max()]
    return nz.numel() < 2 or bool((nz.diff() > rel_gap * w.abs().max()).all())


@cuda
def test_cuda_float32_bfloat16_capture():
    p = build_problem("conv2d_stride", "ce-mean")
    for dtype in (torch.float32, torch.bfloat16):
        m, X, y = _as(p, dtype, "cuda")
        capt = curvlab.capture(m, p.loss_fn, X, y, fisher="mc")
        assert torch.isfinite(capt.grad.float()).all()
        K = curvlab.KFAC(capt)
        out = K.solve(torch.ones(capt.num_params, device="cuda", dtype=dtype), 0.1)
        assert out.device.type == "cuda" and torch.isfinite(out.float()).all()

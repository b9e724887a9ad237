"""curvlab against peer libraries (curvlinops 3.0.1, BackPACK 1.7.1), and our dense
references against the same peers (so a shared misconception would show up twice).

Peer conventions (METHODS.md, verified here): curvlinops ``op @ I`` is the dense matrix
in ``params`` order; KFAC/EKFAC with ``fisher_type="type-2"``, ``kfac_approx="expand"``
and ``separate_weight_and_bias=False`` (one [W | b] block per layer) support only
nn.Linear and nn.Conv2d (integer padding).  BackPACK's KFLR gives ``weight.kflr =
[G, A_w]`` (A without the homogeneous coordinate) and ``bias.kflr = [G]``; it equals
curvlinops' type-2 KFAC for Linear layers, and supports CE and MSE only.
Tolerance: relative error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import reference as R
import torch
from conftest import CURVLINOPS_KFAC_NAMES, RTOL

import curvlab

curvlinops = pytest.importorskip("curvlinops")

BACKPACK_MODELS = ["mlp_tanh", "mlp_relu_nobias", "deep_linear"]
BACKPACK_LOSSES = ["ce-mean", "ce-sum", "mse-mean", "mse-sum"]


def _params(problem):
    return list(R.trainable_params(problem.model).values())


def _dense(op, P):
    return op @ torch.eye(P, dtype=torch.float64)


def test_exact_fisher_vs_curvlinops_ggn(problem):
    op = curvlinops.GGNLinearOperator(
        problem.model, problem.loss_fn, _params(problem), [(problem.X, problem.y)]
    )
    G = _dense(op, problem.P)
    assert R.rel_err(problem.ggn(), G) <= RTOL  # reference vs peer
    F = curvlab.ExactFisher(problem.capture("exact")).to_dense()
    err = R.rel_err(F, G)
    assert err <= RTOL


def test_empirical_fisher_vs_curvlinops_ef(problem):
    op = curvlinops.EFLinearOperator(
        problem.model, problem.loss_fn, _params(problem), [(problem.X, problem.y)]
    )
    E = _dense(op, problem.P)
    assert R.rel_err(problem.ref("empirical").F, E) <= RTOL  # reference vs peer
    F = curvlab.ExactFisher(problem.capture("empirical")).to_dense()
    err = R.rel_err(F, E)
    assert err <= RTOL


def _curvlinops_kfac(problem, cls=None):
    cls = cls or curvlinops.KFACLinearOperator
    return cls(
        problem.model,
        problem.loss_fn,
        _params(problem),
        [(problem.X, problem.y)],
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )


@pytest.mark.parametrize("model_name", CURVLINOPS_KFAC_NAMES)
def test_kfac_vs_curvlinops(problem):
    op = _curvlinops_kfac(problem)
    K = _dense(op, problem.P)
    ref = problem.ref("exact")
    assert R.rel_err(R.dense_kfac(ref.records, ref.scale), K) <= RTOL  # reference vs peer
    kfac = curvlab.KFAC(problem.capture("exact"), damping_mode="standard")
    err = R.rel_err(kfac.to_dense(), K)
    assert err <= RTOL
    tr = torch.as_tensor(op.trace)
    assert abs(float(kfac.trace()) - float(tr)) <= RTOL * abs(float(tr))
    fro = torch.as_tensor(op.frobenius_norm)
    assert abs(float(kfac.frobenius_norm()) - float(fro)) <= RTOL * abs(float(fro))


@pytest.mark.parametrize("model_name", CURVLINOPS_KFAC_NAMES)
@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum"])
@pytest.mark.parametrize("damping_mode", ["standard", "heuristic"])
def test_kfac_inverse_vs_curvlinops(problem, damping_mode):
    """KFAC solve vs curvlinops' KFACInverseLinearOperator: standard = exact
    (A ⊗ G + λI)⁻¹ (use_exact_damping), heuristic = π-factored Tikhonov
    (use_heuristic_damping, min_damping=0)."""
    op = _curvlinops_kfac(problem)
    kfac = curvlab.KFAC(problem.capture("exact"), damping_mode=damping_mode)
    v = R.random_vector(problem.P, seed=8)
    for lam in (1e-3, 1e-1, 10.0):
        kw = (
            {"use_exact_damping": True}
            if damping_mode == "standard"
            else {"use_heuristic_damping": True, "min_damping": 0.0}
        )
        inv = curvlinops.KFACInverseLinearOperator(op, damping=lam, **kw)
        err = R.rel_err(kfac.solve(v, lam), inv @ v)
        assert err <= RTOL, lam


@pytest.mark.parametrize("model_name", CURVLINOPS_KFAC_NAMES)
def test_ekfac_vs_curvlinops(problem):
    op = _curvlinops_kfac(problem, curvlinops.EKFACLinearOperator)
    E = _dense(op, problem.P)
    ref = problem.ref("exact")
    for r in ref.records:
        A, G = R.kfac_factors(r, ref.scale)
        for M in (A, G):
            w = torch.linalg.eigvalsh(M)
            nz = w[w > 1e-10 * w.abs().max()]
            if nz.numel() > 1 and not bool((nz.diff() > 1e-6 * w.abs().max()).all()):
                pytest.skip("degenerate KFAC eigenvalues: EKFAC basis not unique")
    assert R.rel_err(R.dense_ekfac(ref.records, ref.scale), E) <= RTOL  # reference vs peer
    err = R.rel_err(curvlab.EKFAC(problem.capture("exact")).to_dense(), E)
    assert err <= RTOL


@pytest.mark.parametrize("model_name", BACKPACK_MODELS)
@pytest.mark.parametrize("loss_name", BACKPACK_LOSSES)
def test_kfac_factors_vs_backpack_kflr(problem):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    model = backpack.extend(copy.deepcopy(problem.model))
    loss_fn = backpack.extend(copy.deepcopy(problem.loss_fn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = loss_fn(model(problem.X), problem.y)
        with backpack.backpack(KFLR()):
            loss.backward()
    kfac = curvlab.KFAC(problem.capture("exact"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(kfac.factors)
    for (name, f), mod in zip(kfac.factors.items(), linears):
        G_b, A_b = mod.weight.kflr
        d = mod.in_features
        errs = {"G": R.rel_err(f.G, G_b), "A": R.rel_err(f.A[:d, :d], A_b)}
        if mod.bias is not None:
            (G_bias,) = mod.bias.kflr
            errs["bias G"] = R.rel_err(f.G * f.A[d, d], G_bias)
            errs["A[d,d] = 1"] = abs(float(f.A[d, d]) - 1.0)
        R.assert_close_all(errs, RTOL, f"KFLR layer {name}")


@pytest.mark.parametrize(
    "model_name", ["seq_mean", "seq_flatten", "conv2d_stride", "conv2d_same_dil", "conv2d_nobias"]
)
@pytest.mark.parametrize("loss_name", ["ce-mean", "mse-sum", "bce-mean"])
def test_kfac_reduce_vs_curvlinops(problem):
    """Optional knob: KFAC(kfac_approx="reduce") vs curvlinops kfac_approx="reduce"."""
    op = curvlinops.KFACLinearOperator(
        problem.model,
        problem.loss_fn,
        _params(problem),
        [(problem.X, problem.y)],
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=False,
    )
    try:
        kfac = curvlab.KFAC(problem.capture("exact"), kfac_approx="reduce")
    except TypeError:
        pytest.skip("KFAC has no kfac_approx argument")
    err = R.rel_err(kfac.to_dense(), _dense(op, problem.P))
    assert err <= RTOL

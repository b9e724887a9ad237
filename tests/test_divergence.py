"""New comparison metrics against dense float64 formulas (RTOL = 1e-8):

* KL(N(0,(F+λI)⁻¹) ‖ N(0,(C+λI)⁻¹)) = ½[tr((C+λI)(F+λI)⁻¹) − P + logdet(F+λI) −
  logdet(C+λI)] with dense ``F`` (torch.func GGN) and dense ``C`` (reference KFAC,
  EKFAC, FOOF; the toy scaled identity through the interface defaults);
* matrix (Frobenius) cosine ⟨C, F⟩ / (‖C‖ ‖F‖);
* eigenbasis / eigenvalue error split: with ``Q = Q_G ⊗ Q_A`` and ``S = diag(Qᵀ F Q)``,
  ``sqrt(‖F‖² − ‖S‖²)/‖F‖`` and ``‖D − S‖/‖F‖``, adding in squares to ``‖C − F‖/‖F‖``.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import RTOL, get_problem
from torch import nn

from curvlab.compare import Analysis, relative_errors
from curvlab.compare.divergence import kl_records
from curvlab.compare.eigen_split import error_split
from curvlab.methods import unregister_method

DAMPING = (1e-2, 1.0)
CASES = [("mlp_mixed_bias", "ce-mean"), ("conv2d_stride", "mse-sum"), ("seq_flatten", "ce-sum")]


EPS = torch.finfo(torch.float64).eps


def floor(F: torch.Tensor, C: torch.Tensor, lam: float) -> float:
    """The absolute cancellation floor of the Woodbury trace terms, ``~eps (tr C + tr F) / λ``
    (curvlab.compare.divergence), with a factor 100 for the number of terms."""
    return 100 * EPS * float(C.trace() + F.trace()) / lam


def dense_kl(F: torch.Tensor, C: torch.Tensor, lam: float) -> float:
    eye = torch.eye(F.shape[0], dtype=F.dtype)
    ff, cc = F + lam * eye, C + lam * eye
    trace = torch.trace(torch.linalg.solve(ff, cc))
    return float(0.5 * (trace - F.shape[0] + torch.logdet(ff) - torch.logdet(cc)))


def _dense(method: str, ref) -> torch.Tensor:
    if method == "kfac":
        return R.dense_kfac(ref.records, ref.scale)
    if method == "ekfac":
        return R.dense_ekfac(ref.records, ref.scale)
    return R.dense_foof(ref.records)


def _kl(records, method, layer, lam):
    (value,) = [r.value for r in records if (r.method, r.layer, r.damping) == (method, layer, lam)]
    return value


@pytest.mark.parametrize(("model_name", "loss_name"), CASES)
def test_kl_divergence_against_dense(model_name, loss_name):
    prob = get_problem(model_name, loss_name)
    analysis = Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    ref = prob.ref("exact")
    F = prob.ggn()
    Fbd = R.block_diagonal_part(F, ref.records)
    methods = ["exact", "blockdiag", "kfac", "ekfac", "foof"]
    records = kl_records(analysis, methods, DAMPING)
    for lam in DAMPING:
        assert _kl(records, "exact", "network", lam) == 0.0
        expect = dense_kl(F, Fbd, lam)
        got = _kl(records, "blockdiag", "network", lam)
        assert got == pytest.approx(expect, rel=RTOL, abs=floor(F, Fbd, lam))
        for method in ("kfac", "ekfac", "foof"):
            C = _dense(method, ref)
            got = _kl(records, method, "network", lam)
            want = dense_kl(F, C, lam)
            assert got == pytest.approx(want, rel=RTOL, abs=floor(F, C, lam)), (method, lam)
            for rec in ref.records:
                b = (rec.slice, rec.slice)
                got = _kl(records, method, rec.name, lam)
                want = dense_kl(Fbd[b], C[b], lam)
                tol = floor(Fbd[b], C[b], lam)
                assert got == pytest.approx(want, rel=RTOL, abs=tol), (method, rec.name, lam)


def test_kl_of_a_registered_toy_uses_the_interface_defaults():
    import toy_method

    toy_method.register()
    try:
        prob = get_problem("mlp_tanh", "ce-mean")
        analysis = Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
        F = prob.ggn()
        C = float(F.trace()) / prob.P * torch.eye(prob.P, dtype=F.dtype)
        records = kl_records(analysis, ["exact", toy_method.TOY], DAMPING)
        for lam in DAMPING:
            got = _kl(records, toy_method.TOY, "network", lam)
            assert got == pytest.approx(dense_kl(F, C, lam), rel=RTOL, abs=floor(F, C, lam))
    finally:
        unregister_method(toy_method.TOY)


@pytest.mark.parametrize(("model_name", "loss_name"), CASES)
def test_matrix_cosine_against_dense(model_name, loss_name):
    prob = get_problem(model_name, loss_name)
    analysis = Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    ref, F = prob.ref("exact"), prob.ggn()
    for method in ("kfac", "ekfac", "foof"):
        C = _dense(method, ref)
        want = float((C * F).sum() / (C.norm() * F.norm()))
        assert relative_errors(analysis, method)["network"][1] == pytest.approx(want, rel=RTOL)


SPLIT_CASES = [
    ("mlp_mixed_bias", "ce-mean"),
    ("conv2d_stride", "ce-mean"),
    ("seq_flatten", "ce-sum"),
]
"""Cases whose KFAC factors have simple spectra (the eigenbasis, and so the split, is
then unique; MSE with the exact Fisher gives ``G ∝ I`` in the last layer)."""


@pytest.mark.parametrize(("model_name", "loss_name"), SPLIT_CASES)
def test_eigenbasis_eigenvalue_split_against_dense(model_name, loss_name):
    prob = get_problem(model_name, loss_name)
    analysis = Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    ref = prob.ref("exact")
    split = {m: error_split(analysis, m) for m in ("kfac", "ekfac")}
    total_sq = {"kfac": 0.0, "ekfac": 0.0}
    f2_all = 0.0
    for rec in ref.records:
        QG, QA, S_ref = R.ekfac_parts(rec, ref.scale)
        A, G = R.kfac_factors(rec, ref.scale)
        g = rec.per_column_gradients().reshape(-1, rec.size)
        B = ref.scale * g.T @ g  # [W | b] order
        Q = torch.kron(QG, QA)
        S = torch.diag(Q.T @ B @ Q)
        f2 = float(B.square().sum())
        basis = float((f2 - S.square().sum()) / f2) ** 0.5
        d_kfac = torch.outer(torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A)).reshape(-1)
        value = {"kfac": float((d_kfac - S).norm()) / f2**0.5, "ekfac": 0.0}
        f2_all += f2
        for m in ("kfac", "ekfac"):
            got_basis, got_value = split[m][rec.name]
            assert got_basis == pytest.approx(basis, rel=RTOL)
            assert got_value == pytest.approx(value[m], rel=RTOL, abs=1e-12)
            C = torch.kron(G, A) if m == "kfac" else Q @ torch.diag(S) @ Q.T
            total = float((C - B).norm()) / f2**0.5
            assert got_basis**2 + got_value**2 == pytest.approx(total**2, rel=RTOL)
            total_sq[m] += total**2 * f2
        assert torch.allclose(S_ref.reshape(-1), S, rtol=1e-10, atol=1e-14 * S.abs().max())
    for m in ("kfac", "ekfac"):
        basis, value = split[m]["network"]
        assert basis**2 + value**2 == pytest.approx(total_sq[m] / f2_all, rel=RTOL)


def test_split_with_exact_blocks_of_norm_layers():
    """KFAC keeps the exact block of a LayerNorm: no error there, and the network split
    still adds in squares to the error of the block-diagonal part (dense matrices)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    analysis = Analysis(model, nn.CrossEntropyLoss(), X, y)
    split = error_split(analysis, "kfac")
    basis, value = split["1"]
    assert value == 0.0 and basis <= 4 * EPS**0.5  # ‖F‖² − ‖S‖²: half the digits (docstring)
    C = analysis.curvature("kfac").to_dense()
    F = analysis.blockdiag.to_dense()
    total = float((C - F).norm() / F.norm())
    basis, value = split["network"]
    assert basis**2 + value**2 == pytest.approx(total**2, rel=RTOL)

"""KFAC (expand) against dense Kronecker references built from hook records.

Reference per layer: A = Σ_{n,t} ā āᵀ / (N T), G = s Σ_{n,c,t} e eᵀ (inputs and
output gradients from our own hooks; conv patches from the Jacobian of the conv
w.r.t. its weight), dense block kron(G, A) in row-major [W | b], mapped to the flat
layout.  Tolerance: relative error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import DAMPINGS, RTOL, mc_generator

import curvlab


def _setup(problem, fisher, mc_samples=1):
    capt = problem.capture(fisher, mc_samples=mc_samples, generator=mc_generator(21))
    return capt, problem.ref(fisher, capt)


def _kron_spectrum(records, scale) -> torch.Tensor:
    eigs = []
    for r in records:
        A, G = R.kfac_factors(r, scale)
        eigs.append(torch.outer(torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A)).reshape(-1))
    return torch.cat(eigs)


def test_kfac_factors(problem, fisher):
    capt, ref = _setup(problem, fisher)
    kfac = curvlab.KFAC(capt)
    assert list(kfac.blocks) == [r.name for r in ref.records]
    for r in ref.records:
        A, G = R.kfac_factors(r, ref.scale)
        f = kfac.factors[r.name]
        errA, errG = R.rel_err(f.A, A), R.rel_err(f.G, G)
        assert errA <= RTOL and errG <= RTOL, (r.name, errA, errG)


@pytest.mark.parametrize("damping_mode", ["standard", "heuristic"])
def test_kfac(problem, fisher, damping_mode):
    capt, ref = _setup(problem, fisher)
    kfac = curvlab.KFAC(capt, damping_mode=damping_mode)
    D = R.dense_kfac(ref.records, ref.scale)

    def damped(lam):
        if damping_mode == "standard":
            return D + lam * torch.eye(D.shape[0], dtype=D.dtype)
        return torch.block_diag(*[R.kfac_heuristic_dense(r, ref.scale, lam) for r in ref.records])

    errs = R.interface_errors(
        kfac, D, DAMPINGS, damped=damped, spectrum=_kron_spectrum(ref.records, ref.scale)
    )
    R.assert_close_all(errs, RTOL, f"KFAC-{damping_mode} {problem} {fisher}")


@pytest.mark.parametrize("fisher", ["exact"])
def test_kfac_blocks(problem, fisher):
    capt, ref = _setup(problem, fisher)
    for mode in ("standard", "heuristic"):
        kfac = curvlab.KFAC(capt, damping_mode=mode)
        for r, (name, blk) in zip(ref.records, kfac.blocks.items()):
            assert name == r.name
            assert blk.num_params == r.size
            A, G = R.kfac_factors(r, ref.scale)
            D = R.wb_to_flat(torch.kron(G, A), r)
            if mode == "standard":
                damped = None
            else:

                def damped(lam, r=r):
                    return R.kfac_heuristic_dense(r, ref.scale, lam)

            errs = R.interface_errors(blk, D, [1e-1], damped=damped)
            R.assert_close_all(errs, RTOL, f"KFAC-{mode} block {name}")


@pytest.mark.parametrize("model_name", ["mlp_tanh", "conv2d_stride"])
def test_kfac_mc_several_samples(problem):
    capt, ref = _setup(problem, "mc", mc_samples=3)
    D = R.dense_kfac(ref.records, ref.scale)
    errs = R.interface_errors(
        curvlab.KFAC(capt, damping_mode="standard"),
        D,
        DAMPINGS,
        spectrum=_kron_spectrum(ref.records, ref.scale),
    )
    R.assert_close_all(errs, RTOL, "KFAC mc S=3")

"""KFOC: the optimal Kronecker approximation of each exact layer block (Van Loan–Pitsianis).

For a layer's exact block ``B = s Σ_nc vec(Γ_nc) vec(Γ_nc)ᵀ`` (row-major ``[W | b]``
layout, ``Γ_nc = Σ_t e_nct ā_ntᵀ``, ``d_out x d_in_h``) KFOC is

    X* ⊗ Y* = argmin_{X, Y} ‖B − X ⊗ Y‖_F    (X: d_out x d_out, Y: d_in_h x d_in_h).

With the rearrangement ``R(B)[(o,o'), (i,i')] = B[(o,i), (o',i')]`` the objective is
``‖R(B) − vec X vec Yᵀ‖_F``, so ``X* ⊗ Y* = σ₁ X̂ ⊗ Ŷ`` for the top singular triple
``(σ₁, vec X̂, vec Ŷ)`` of ``R(B)`` and ``‖B − X* ⊗ Y*‖_F² = ‖B‖_F² − σ₁²``.  Because
KFAC's ``G ⊗ A`` is one Kronecker product among all, KFOC's error is never above
KFAC's.  For PSD ``B`` the factors are symmetric and can be taken PSD (the sign is
fixed so that ``tr Ŷ > 0``).

``R(B)`` is applied without forming ``B``: ``R(B) Y = s Σ_nc Γ_nc Y Γ_ncᵀ`` and
``R(B)ᵀ X = s Σ_nc Γ_ncᵀ X Γ_nc``, computed through location pairs,
``Γ Y Γᵀ = Σ_{t,t'} e_t (ā_tᵀ Y ā_t') e_t'ᵀ`` (``O(N T (T + d_in) d_in + N C' T (T +
d_out) d_out)`` per product, chunked over samples).  The top singular pair comes
from subspace iteration on ``R(B)ᵀ R(B)`` (a block of :data:`BLOCK` symmetric
matrices, started from ``I``, Rayleigh–Ritz each step; started from ``I`` alone, the
first step gives Shampoo's factors) until the top Ritz pair's residual is below
``tol · σ₁²``.

The block is diagonal in the factors' eigenbasis (``D = σ₁ s_X s_Yᵀ``), so ``solve``
is ``(X* ⊗ Y* + λI)⁻¹`` exactly (standard damping).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.config import options
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen
from curvlab.errors import ConvergenceError
from curvlab.numerics import SOLVE_DTYPE, compute_dtype

BLOCK = 4
"""Subspace size of the iteration (more vectors: faster convergence per step)."""


def _chunks(lc: LayerCapture, k: int) -> range:
    """Sample chunk starts so that the location-pair temporaries stay within
    ``options.chunk_bytes`` (``k`` matrices at a time)."""
    c, n, t, o = lc.e.shape
    per_sample = k * (t * t + t * max(lc.a.shape[-1], o) * (1 + c)) * 8
    return range(0, n, max(1, options.chunk_bytes // max(1, per_sample)))


def rearranged_product(lc: LayerCapture, y: Tensor, scale: float) -> Tensor:
    """``R(B) Y = s Σ_nc Γ_nc Y Γ_ncᵀ`` for ``y (k, d_in_h, d_in_h)`` -> ``(k, d_out, d_out)``."""
    a, e = lc.a, lc.e
    out = y.new_zeros(y.shape[0], e.shape[-1], e.shape[-1])
    step = _chunks(lc, y.shape[0]).step
    for i in range(0, a.shape[0], step):
        ac = a[i : i + step].to(SOLVE_DTYPE)
        ec = e[:, i : i + step].to(SOLVE_DTYPE)
        w = torch.einsum("kntj,nsj->knts", torch.einsum("nti,kij->kntj", ac, y), ac)
        we = torch.einsum("knts,cnsp->kcntp", w, ec)
        out += torch.einsum("cnto,kcntp->kop", ec, we)
    return out.mul_(scale)


def rearranged_transpose_product(lc: LayerCapture, x: Tensor, scale: float) -> Tensor:
    """``R(B)ᵀ X = s Σ_nc Γ_ncᵀ X Γ_nc`` for ``x (k, d_out, d_out)`` -> ``(k, d_in_h, d_in_h)``."""
    a, e = lc.a, lc.e
    out = x.new_zeros(x.shape[0], a.shape[-1], a.shape[-1])
    step = _chunks(lc, x.shape[0]).step
    for i in range(0, a.shape[0], step):
        ac = a[i : i + step].to(SOLVE_DTYPE)
        ec = e[:, i : i + step].to(SOLVE_DTYPE)
        v = torch.einsum("kcntp,cnsp->knts", torch.einsum("cnto,kop->kcntp", ec, x), ec)
        out += torch.einsum("ntj,knts,nsi->kji", ac, v, ac)
    return out.mul_(scale)


def _orthonormal(mats: Tensor) -> Tensor:
    """Orthonormal basis (Frobenius inner product) of the span of ``mats (k, d, d)``."""
    q = torch.linalg.qr(mats.reshape(mats.shape[0], -1).T).Q
    return q.T.reshape(mats.shape)


def optimal_kronecker(
    lc: LayerCapture, scale: float, tol: float = 1e-12, max_iter: int = 1000
) -> tuple[Tensor, Tensor]:
    """``(X*, Y*)`` with ``X* ⊗ Y*`` the nearest Kronecker product to the layer's exact
    block (module docstring), float64, symmetric, ``tr Y* ≥ 0``.

    Raises:
        ConvergenceError: the iteration did not reach ``tol`` in ``max_iter`` steps.
    """
    d_in = lc.a.shape[-1]
    k = min(BLOCK, d_in * (d_in + 1) // 2)
    gen = torch.Generator(device=lc.a.device).manual_seed(0)
    start = torch.randn(k, d_in, d_in, generator=gen, dtype=SOLVE_DTYPE, device=lc.a.device)
    start = start + start.mT
    start[0] = torch.eye(d_in, dtype=SOLVE_DTYPE, device=lc.a.device)
    y = _orthonormal(start)
    for _ in range(max_iter):
        x = rearranged_product(lc, y, scale)
        values, vectors = torch.linalg.eigh(x.reshape(k, -1) @ x.reshape(k, -1).T)
        values, vectors = values.flip(0), vectors.flip(1)
        rot = vectors.T
        y = torch.einsum("ij,jab->iab", rot, y)
        x = torch.einsum("ij,jab->iab", rot, x)
        top = values[0]
        if top <= 0:  # B = 0
            zeros = torch.zeros(lc.e.shape[-1], lc.e.shape[-1], dtype=SOLVE_DTYPE)
            return zeros.to(y.device), torch.zeros_like(y[0])
        z = rearranged_transpose_product(lc, x, scale)
        residual = torch.linalg.matrix_norm(z[0] - top * y[0]) / top
        if residual <= tol:
            sigma = top.sqrt()
            y_star, x_star = y[0], x[0] / sigma
            if y_star.trace() < 0:
                y_star, x_star = -y_star, -x_star
            y_star = (y_star + y_star.T) / 2
            x_star = (x_star + x_star.T) / 2
            return sigma * x_star, y_star
        y = _orthonormal(z)
    raise ConvergenceError(
        f"KFOC's power iteration for layer '{lc.name}' did not converge in {max_iter} "
        f"steps (residual {float(residual):.1e} > {tol:g}); its top two singular values "
        "are nearly equal, so the optimal Kronecker factors are not well defined."
    )


class KFOC(LayerwiseCurvature):
    """Block-diagonal ``⊕_l X*_l ⊗ Y*_l``, the optimal Kronecker factors per layer.

    Args:
        capture: The capture to read (its Fisher type defines the exact blocks).
        tol: Relative residual of the top singular pair at convergence.
        max_iter: Most subspace-iteration steps per layer.
    """

    def __init__(self, capture: Capture, tol: float = 1e-12, max_iter: int = 1000):
        dtype = compute_dtype(capture.dtype)
        blocks = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        for lc in capture.layers:
            x, y = optimal_kronecker(lc, capture.scale, tol, max_iter)
            self.factors[lc.name] = (x, y)
            ex = Eigen.of(x, f"KFOC's output factor of layer '{lc.name}'")
            ey = Eigen.of(y, f"KFOC's input factor of layer '{lc.name}'")
            d = torch.outer(ex.values, ey.values)
            blocks[lc.name] = EigenBlock(
                lc.info, ex.vectors, ey.vectors, d, dtype, kronecker_factored=True
            )
        super().__init__(blocks)

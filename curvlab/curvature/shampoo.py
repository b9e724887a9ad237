"""Shampoo's Kronecker factors of each exact layer block (Gupta et al. 2018; Morwani et
al. 2025, "A New Perspective on Shampoo's Preconditioner", ICLR, arXiv 2406.17748).

Morwani et al. write the curvature of a weight matrix as ``H = E[g gᵀ]`` over per-sample
(per-column) gradients ``g = vec(G)``, its optimal Kronecker approximation as the top
singular pair of the rearrangement ``R(H)`` (Van Loan–Pitsianis), and show that one step
of power iteration from the identity gives the factors ``E[G Gᵀ]`` and ``E[Gᵀ G]``:
Shampoo's ``(Σ G Gᵀ)^{1/2} ⊗ (Σ Gᵀ G)^{1/2}``, squared, is that step ("Shampoo²").  Here
``H`` is a layer's exact block ``B = s Σ_nc vec(Γ_nc) vec(Γ_nc)ᵀ`` of the captured
Fisher type (row-major ``[W | b]`` layout, ``Γ_nc = Σ_t e_nct ā_ntᵀ``; ``E = s Σ``, i.e.
``1/N Σ`` for a mean loss, ``Σ`` for a sum):

    L = s Σ_nc Γ_nc Γ_ncᵀ = E[G Gᵀ]  (d_out x d_out),
    R = s Σ_nc Γ_ncᵀ Γ_nc = E[Gᵀ G]  (d_in_h x d_in_h),

i.e. ``L = R(B) I`` and ``R = R(B)ᵀ I`` for the rearrangement of
:mod:`curvlab.curvature.kfoc`.  ``tr L = tr R = tr B = E‖G‖²``.  Two matrices, each a
curvature object, each of degree 1 in ``B`` (so ``s`` enters once, as in ``B``):

* ``exponent=1`` (method ``shampoo2``, "Shampoo²"): ``C = L ⊗ R / tr B``, i.e.
  ``E[G Gᵀ] ⊗ E[Gᵀ G] / E‖G‖²``.  The power-iteration step fixes the factors up to a
  scalar (Morwani et al. compare approximations by the matrix cosine, which ignores it);
  the scalar ``1 / tr B`` is the one that makes ``C = B`` whenever ``B`` is a Kronecker
  product (``B = X ⊗ Y`` gives ``L = X tr Y``, ``R = Y tr X``), so that relative errors
  compare like with like.
* ``exponent=1/2`` (method ``shampoo``): ``C = L^{1/2} ⊗ R^{1/2}`` (eigenvalues of a
  factor at or below its rank tolerance count as 0 before the root), Shampoo's own
  approximation of the gradient second moment (Gupta et al.'s bound
  ``B ⪯ r L^{1/2} ⊗ R^{1/2}``); Shampoo's update ``L^{-1/4} ∇W R^{-1/4}`` is
  ``C^{-1/2} g``.  ``C`` has another scale (and power) than ``B``: read its Frobenius
  cosine and direction cosines rather than its relative error.

Both are damped like every curvature here, ``solve(v, λ) = (C + λI)⁻¹ v`` exactly in the
factors' eigenbasis (not Shampoo's optimizer update, which also drops the damping into
the factors, ``(L + εI)^{-1/4}``).  tests/test_approximations.py checks both against
these formulas on per-sample gradients from ``torch.func``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen
from curvlab.curvature.kfoc import rearranged_product, rearranged_transpose_product
from curvlab.errors import OptionError
from curvlab.numerics import SOLVE_DTYPE, compute_dtype

EXPONENTS = (1.0, 0.5)


def shampoo_factors(lc: LayerCapture, scale: float) -> tuple[Tensor, Tensor]:
    """``(L, R)`` of the module docstring, float64."""
    dev = lc.a.device
    eye_in = torch.eye(lc.a.shape[-1], dtype=SOLVE_DTYPE, device=dev)
    eye_out = torch.eye(lc.e.shape[-1], dtype=SOLVE_DTYPE, device=dev)
    left = rearranged_product(lc, eye_in.unsqueeze(0), scale)[0]
    right = rearranged_transpose_product(lc, eye_out.unsqueeze(0), scale)[0]
    return (left + left.T) / 2, (right + right.T) / 2


def _root(values: Tensor) -> Tensor:
    """Square roots of a factor's eigenvalues, with those at or below the rank tolerance
    ``n · eps · max`` set to 0 (rounding noise of size ``eps`` would otherwise become
    ``sqrt(eps)`` after the root)."""
    tol = values.numel() * torch.finfo(values.dtype).eps * values.max().clamp_min(0)
    return torch.where(values > tol, values, torch.zeros_like(values)).sqrt()


class Shampoo(LayerwiseCurvature):
    """Block-diagonal Shampoo² (``exponent=1``) or Shampoo (``exponent=1/2``) matrix.

    Args:
        capture: The capture to read (its Fisher type defines the blocks ``B``).
        exponent: ``1`` for ``L ⊗ R / tr B``, ``0.5`` for ``L^{1/2} ⊗ R^{1/2}``.
    """

    def __init__(self, capture: Capture, exponent: float = 1.0):
        if exponent not in EXPONENTS:
            raise OptionError(f"exponent must be 1 (Shampoo²) or 0.5 (Shampoo), got {exponent!r}")
        self.exponent = exponent
        dtype = compute_dtype(capture.dtype)
        blocks = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        for lc in capture.layers:
            left, right = shampoo_factors(lc, capture.scale)
            self.factors[lc.name] = (left, right)
            el = Eigen.of(left, f"Shampoo's factor L of layer '{lc.name}'")
            er = Eigen.of(right, f"Shampoo's factor R of layer '{lc.name}'")
            if exponent == 1.0:
                total = left.trace()
                d = (
                    torch.outer(el.values, er.values) / total
                    if total > 0
                    else el.values.new_zeros(el.values.numel(), er.values.numel())
                )
            else:
                d = torch.outer(_root(el.values), _root(er.values))
            blocks[lc.name] = EigenBlock(
                lc.info, el.vectors, er.vectors, d, dtype, kronecker_factored=True
            )
        super().__init__(blocks)

"""Kronecker factors from a capture (KFAC / KFC "expand" convention).

For a layer with homogeneous inputs ``ā (N, T, d_in_h)`` and output-gradient columns
``e (C', N, T, d_out)``:

    A = Σ_{n,t} ā_nt ā_ntᵀ / (N T),        G = s Σ_{c,n,t} e_nct e_nctᵀ,

so that ``A ⊗ G`` has the Fisher's scale (curvlinops ``kfac_approx="expand"``; for
conv layers this is KFC's Ω ⊗ Γ).  The ``"reduce"`` variant (curvlinops
``kfac_approx="reduce"``) first averages ``ā`` and sums ``e`` over ``t``:
``A = Σ_n ā_n ā_nᵀ / N`` with ``ā_n = mean_t ā_nt``, ``G = s Σ_{c,n} ē_nc ē_ncᵀ`` with
``ē_nc = Σ_t e_nct``.  Both coincide when ``T = 1``.  In the row-major ``[W | b]``
layout the dense block is ``kron(G, A)``.  Factors are accumulated in the compute dtype
and returned in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from curvlab.capture import LayerCapture
from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError, SingularMatrixError
from curvlab.layers import LayerKind
from curvlab.numerics import SOLVE_DTYPE, check_finite, compute_dtype, symmetric_mm

KFAC_APPROX = ("expand", "reduce")


def input_factor_sum(a: Tensor, approx: str = "expand") -> tuple[Tensor, int]:
    """``Σ ā āᵀ`` (float64, ``(d_in_h, d_in_h)``) over the rows of ``a (N, T, d_in_h)`` —
    every location for ``"expand"``, each sample's location mean for ``"reduce"`` — and
    the number of rows per sample (``T`` or 1).  ``A`` is the sum over ``N`` times that."""
    if approx == "reduce":
        a = a.mean(dim=1, keepdim=True)
    flat = a.reshape(-1, a.shape[-1]).to(compute_dtype(a.dtype))
    return symmetric_mm(flat.T).to(SOLVE_DTYPE), a.shape[1]


def input_factor(a: Tensor, approx: str = "expand") -> Tensor:
    """``A`` of shape ``(d_in_h, d_in_h)`` in float64 from ``a (N, T, d_in_h)``."""
    total, rows = input_factor_sum(a, approx)
    return total.div_(a.shape[0] * rows)


def grad_factor(e: Tensor, scale: float, approx: str = "expand") -> Tensor:
    """``G`` of shape ``(d_out, d_out)`` in float64 from ``e (C', N, T, d_out)``.

    Raises:
        MemoryBudgetError: ``G`` would exceed ``curvlab.config.options.memory_budget``
            (a large layer read through its per-sample gradients, where ``d_out = P_l``).
    """
    need = e.shape[-1] ** 2 * 8
    if need > options.memory_budget:
        raise MemoryBudgetError(
            f"a {e.shape[-1]} x {e.shape[-1]} gradient factor needs about "
            f"{format_bytes(need)}, over the memory budget of "
            f"{format_bytes(options.memory_budget)}. Freeze the layer, use the exact "
            "objects (ExactFisher, BlockDiagFisher), or raise "
            "curvlab.config.options.memory_budget."
        )
    if approx == "reduce":
        e = e.sum(dim=2, keepdim=True)
    flat = e.reshape(-1, e.shape[-1]).to(compute_dtype(e.dtype))
    return symmetric_mm(flat.T).to(SOLVE_DTYPE).mul_(scale)


@dataclass
class Eigen:
    """Symmetric eigendecomposition ``M = Q diag(values) Qᵀ`` (float64)."""

    values: Tensor
    vectors: Tensor

    @classmethod
    def of(cls, m: Tensor, what: str = "a Kronecker factor") -> Eigen:
        """Eigendecomposition of the symmetric ``m`` (negative rounding clamped to 0).

        Raises:
            NonFiniteError: ``m`` has NaN/Inf entries (typically a diverged run).
            SingularMatrixError: LAPACK's ``eigh`` did not converge.
        """
        m = m.to(SOLVE_DTYPE)
        check_finite(
            m, what, "Its statistics are not finite; lower the learning rate or raise the damping."
        )
        try:
            values, vectors = torch.linalg.eigh(m)
        except torch.linalg.LinAlgError as err:
            raise SingularMatrixError(
                f"the eigendecomposition of {what} ({m.shape[0]} x {m.shape[0]}) did not "
                f"converge ({err}); its entries span too many orders of magnitude."
            ) from err
        return cls(values.clamp_min(0.0), vectors)


@dataclass
class LayerFactors:
    """``A``, ``G`` and their eigendecompositions for one layer (``info``: its layout)."""

    info: LayerKind
    A: Tensor
    G: Tensor

    @classmethod
    def of(cls, layer: LayerCapture, scale: float, approx: str = "expand") -> LayerFactors:
        """Factors of ``layer`` with the ``"expand"`` or ``"reduce"`` convention."""
        return cls(layer.info, input_factor(layer.a, approx), grad_factor(layer.e, scale, approx))

    @cached_property
    def eig_A(self) -> Eigen:
        return Eigen.of(self.A, f"the input factor A of layer '{self.info.name}'")

    @cached_property
    def eig_G(self) -> Eigen:
        return Eigen.of(self.G, f"the gradient factor G of layer '{self.info.name}'")

    @property
    def pi(self) -> float:
        """Heuristic-damping π = sqrt((tr A / dim A) / (tr G / dim G)); 1 if a trace is 0."""
        ta = self.A.trace() / self.A.shape[0]
        tg = self.G.trace() / self.G.shape[0]
        if ta <= 0 or tg <= 0:
            return 1.0
        return float((ta / tg).sqrt())

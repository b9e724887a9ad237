"""One-batch SINGD (Lin et al. 2024, IKFAC rule) factors as a curvature object.

SINGD keeps structured factors ``K``, ``C`` with ``K Kᵀ ≈ (A + λI)⁻¹`` and
``C Cᵀ ≈ (G + λI)⁻¹`` (:mod:`curvlab.optim.singd`).  On one batch, the IKFAC update
``m_K = ½[Π̂(Kᵀ S K) − I]`` with ``S = A + λI`` stops where ``Π̂(Kᵀ S K) = I``, i.e. where
``Kᵀ S K`` equals ``I`` on ``M = pattern ∪ patternᵀ`` (``Π̂`` doubles the entries whose
transpose is off the pattern, :mod:`curvlab.optim.structures`).  The one-batch method is
that fixed point, for both factors: with ``Ŝ(λ) = (K Kᵀ)⁻¹`` — the unique positive definite
matrix that equals ``S`` on ``M`` and whose inverse ``K Kᵀ`` vanishes off ``M`` —

    solve:   V ↦ Ŝ_G(λ)⁻¹ V Ŝ_A(λ)⁻¹        (SINGD's direction ``C Cᵀ ∇W̄ K Kᵀ``),
    matrix:  C_l = B_G ⊗ B_A,   B = lim_{λ→0} (Ŝ(λ) − λI),

for ``∇W̄`` the ``d_out x d_in_h`` gradient matrix of the layer.

* Dense, diagonal, block-diagonal (``M`` is the pattern, ``Π`` its mask): ``Ŝ(λ) =
  Π(A) + λI``, so ``B = Π(A)`` and the method is KFAC's factors restricted to the
  structure, damped per factor with the same ``λ`` (SINGD's rule: ``(Π(A) + λI) ⊗
  (Π(G) + λI) = C_l + λ(Π(A) ⊗ I + I ⊗ Π(G)) + λ²I``).
* Hierarchical (``k1``, ``k2``, SINGD's "hierarchical" structure; default
  ``k1 = k2 = 15``): index sets ``I1`` (the first ``k1``), ``I3`` (the last ``k2``) and
  ``I2`` (the ``m = d − k1 − k2`` between), ``r = I1 ∪ I3``.  ``K`` is dense in the rows
  ``I1``, diagonal on ``I2 x I2``, dense on ``I3 x (I2 ∪ I3)`` and zero elsewhere, so
  ``M`` lacks only the off-diagonal entries of the ``I2 x I2`` block.  The fixed point
  has the closed form

      Ŝ(λ) = S, except off the diagonal of the I2 x I2 block: S_2r S_rr⁻¹ S_r2 there,

  (its Schur complement ``Ŝ_22 − S_2r S_rr⁻¹ S_r2`` is the diagonal of ``S``'s, so
  ``(Ŝ⁻¹)_22`` is diagonal), unique up to ``K ↦ K O`` with ``O`` orthogonal in the
  structure (``K Kᵀ`` is unchanged).  Here ``Ŝ(λ) − λI = B(λ)`` depends on ``λ``:
  ``B(λ)`` is ``A`` with the off-diagonal ``I2 x I2`` entries of
  ``A_2r (A_rr + λI)⁻¹ A_r2``; the matrix uses ``B(0)`` with the pseudo-inverse
  ``A_rr⁺`` (eigenvalues at or below the rank tolerance ``|r| · eps · max`` dropped), the
  ``λ → 0`` limit for a positive semi-definite ``A``.  ``solve`` inverts
  ``(B_G(λ) + λI) ⊗ (B_A(λ) + λI)`` (Cholesky of each factor, per ``λ``), which differs
  from ``C_l + λI`` by :meth:`~HierarchicalSINGDBlock.damping_excess`.  Factors of
  dimension ``d ≤ k1 + k2`` are dense (``m = 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen, LayerFactors
from curvlab.errors import OptionError, SingularMatrixError
from curvlab.numerics import SOLVE_DTYPE, compute_dtype
from curvlab.optim.structures import (
    BlockDiagonal,
    Dense,
    Diagonal,
    Hierarchical,
    Structure,
    as_structure,
)

CLOSED_STRUCTURES = (Dense, Diagonal, BlockDiagonal)
"""Structures closed under transposition: ``B = Π(A)`` for every ``λ``."""


class SINGDBlock(EigenBlock):
    """One layer's ``Π(A) ⊗ Π(G)`` with SINGD's per-factor damping."""

    def __init__(self, factors: LayerFactors, structure: Structure, dtype: torch.dtype):
        name = factors.info.name
        self.a_eig = Eigen.of(structure.project(factors.A).to_dense(), f"Π(A) of layer '{name}'")
        self.g_eig = Eigen.of(structure.project(factors.G).to_dense(), f"Π(G) of layer '{name}'")
        super().__init__(
            factors.info,
            self.g_eig.vectors,
            self.a_eig.vectors,
            torch.outer(self.g_eig.values, self.a_eig.values),
            dtype,
            kronecker_factored=True,
        )

    def denominator(self, damping: float) -> Tensor:
        return torch.outer(self.g_eig.values + damping, self.a_eig.values + damping)

    def damping_excess(self, damping: float) -> Tensor:
        """``‖λ(Π(A) ⊗ I + I ⊗ Π(G)) + (λ² − λ) I‖_F``, in the eigenbasis."""
        g, a = self.g_eig.values, self.a_eig.values
        excess = damping * (g.unsqueeze(1) + a.unsqueeze(0)) + (damping**2 - damping)
        return torch.linalg.vector_norm(excess).to(self.dtype)


class HierarchicalFactor:
    """``B(λ)`` of one Kronecker factor ``U (d, d)`` (float64) for a hierarchical structure
    (module docstring)."""

    def __init__(self, u: Tensor, structure: Hierarchical, what: str):
        dim = u.shape[0]
        k1, m, _ = structure.sizes(dim)
        self.u = u.to(SOLVE_DTYPE)
        self.mid = torch.arange(k1, k1 + m, device=u.device)
        rest = torch.cat([torch.arange(k1), torch.arange(k1 + m, dim)]).to(u.device)
        self.rest_eig: Eigen | None = None
        if m > 1 and rest.numel() > 0:
            self.rest_eig = Eigen.of(self.u[rest][:, rest], f"the corner blocks of {what}")
            self.cross = self.rest_eig.vectors.T @ self.u[rest][:, self.mid]  # Qᵀ U_r2

    def completed(self, damping: float) -> Tensor:
        """``B(λ)``: ``U`` with the off-diagonal entries of its ``I2 x I2`` block replaced
        by those of ``U_2r (U_rr + λI)⁻¹ U_r2`` (``U_rr⁺`` at ``λ = 0``)."""
        out = self.u.clone()
        m = self.mid.numel()
        if m < 2:
            return out
        if self.rest_eig is None:
            block = torch.zeros(m, m, dtype=out.dtype, device=out.device)
        else:
            values = self.rest_eig.values
            if damping == 0:
                tol = values.numel() * torch.finfo(values.dtype).eps * values.max().clamp_min(0)
                inv = torch.where(values > tol, 1 / values.clamp_min(tol), torch.zeros_like(values))
            else:
                inv = 1 / (values + damping)
            block = self.cross.T @ (inv.unsqueeze(1) * self.cross)
        block.diagonal().copy_(self.u[self.mid, self.mid])
        out[self.mid.unsqueeze(1), self.mid.unsqueeze(0)] = block
        return out


def _cholesky(m: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of the symmetric ``m``.

    Raises:
        SingularMatrixError: ``m`` is not numerically positive definite.
    """
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise SingularMatrixError(
            f"{what} ({m.shape[0]} x {m.shape[0]}) is not numerically positive definite; "
            "raise the damping."
        )
    return factor


class HierarchicalSINGDBlock(EigenBlock):
    """One layer's ``B_G ⊗ B_A`` for a hierarchical structure; ``solve`` inverts
    ``(B_G(λ) + λI) ⊗ (B_A(λ) + λI)`` (module docstring)."""

    def __init__(self, factors: LayerFactors, structure: Hierarchical, dtype: torch.dtype):
        name = factors.info.name
        self.a_factor = HierarchicalFactor(factors.A, structure, f"A of layer '{name}'")
        self.g_factor = HierarchicalFactor(factors.G, structure, f"G of layer '{name}'")
        self.a_matrix, self.g_matrix = self.a_factor.completed(0.0), self.g_factor.completed(0.0)
        a_eig = Eigen.of(self.a_matrix, f"SINGD's hierarchical A of layer '{name}'")
        g_eig = Eigen.of(self.g_matrix, f"SINGD's hierarchical G of layer '{name}'")
        super().__init__(
            factors.info,
            g_eig.vectors,
            a_eig.vectors,
            torch.outer(g_eig.values, a_eig.values),
            dtype,
            kronecker_factored=True,
        )
        self._damped: dict[float, tuple[Tensor, Tensor]] = {}

    def damped_factors(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(B_G(λ) + λI, B_A(λ) + λI)``, float64."""
        if damping not in self._damped:
            g = self.g_factor.completed(damping)
            a = self.a_factor.completed(damping)
            g.diagonal().add_(damping)
            a.diagonal().add_(damping)
            self._damped[damping] = (g, a)
        return self._damped[damping]

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        if damping == 0:
            return super()._solve(v, damping)
        g, a = self.damped_factors(damping)
        name = self.info.name
        left = _cholesky(g, f"SINGD's damped hierarchical G of layer '{name}'")
        right = _cholesky(a, f"SINGD's damped hierarchical A of layer '{name}'")
        x = torch.cholesky_solve(self.info.to_matrix(v.to(SOLVE_DTYPE)), left)
        x = torch.cholesky_solve(x.T, right).T
        return self.info.to_flat(x).to(self.dtype)

    def damping_excess(self, damping: float) -> Tensor:
        """``‖X ⊗ Y − B_G ⊗ B_A − λI‖_F`` for ``X = B_G(λ) + λI``, ``Y = B_A(λ) + λI``,
        from the Frobenius inner products of the terms of
        ``(X − B_G) ⊗ Y + B_G ⊗ (Y − B_A) − λ I ⊗ I``."""
        x, y = self.damped_factors(damping)
        eye_g = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
        eye_a = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
        lefts = [x - self.g_matrix, self.g_matrix, -damping * eye_g]
        rights = [y, y - self.a_matrix, eye_a]
        total = sum(
            (li * lj).sum() * (ri * rj).sum()
            for li, ri in zip(lefts, rights)
            for lj, rj in zip(lefts, rights)
        )
        return total.clamp_min(0).sqrt().to(self.dtype)


class SINGDCurvature(LayerwiseCurvature):
    """Block-diagonal one-batch SINGD (IKFAC fixed point) matrix for a structure.

    Args:
        capture: The capture to read.
        structure: ``"dense"``, ``"diagonal"``, ``"block_diagonal"`` (blocks of 16),
            ``"hierarchical"`` (``k1 = k2 = 15``), or a
            :class:`~curvlab.optim.structures.Structure` of those kinds (e.g.
            ``Hierarchical(k1=8, k2=4)``), the same for ``K`` and ``C``.

    Raises:
        OptionError: a structure of another kind.
    """

    def __init__(self, capture: Capture, structure: str | Structure = "dense"):
        struct = as_structure(structure)
        if isinstance(struct, CLOSED_STRUCTURES):
            kind = SINGDBlock
        elif isinstance(struct, Hierarchical):
            kind = HierarchicalSINGDBlock
        else:
            raise OptionError(
                f"one-batch SINGD knows the dense, diagonal, block_diagonal and hierarchical "
                f"structures, not '{struct.name}'; train with curvlab.optim.SINGD instead"
            )
        self.structure = struct
        dtype = compute_dtype(capture.dtype)
        super().__init__(
            {
                lc.name: kind(LayerFactors.of(lc, capture.scale), struct, dtype)
                for lc in capture.layers
            }
        )

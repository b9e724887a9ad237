"""One-batch SINGD (Lin et al. 2024, IKFAC rule) factors as a curvature object.

SINGD keeps structured factors ``K``, ``C`` with ``K Kᵀ ≈ (A + λI)⁻¹`` and
``C Cᵀ ≈ (G + λI)⁻¹`` (:mod:`curvlab.optim.singd`).  On one batch, the IKFAC update
``m_K = ½[Π̂(Kᵀ(A + λI)K) − I]`` stops where ``Π̂(Kᵀ(A + λI)K) = I``; for a pattern that
is closed under transposition (dense, diagonal, block-diagonal) that fixed point is
``K Kᵀ = (Π(A) + λI)⁻¹`` with ``Π`` the pattern's mask (per diagonal block
``K_bbᵀ (A_bb + λI) K_bb = I``).  So the one-batch method is

    C_l = Π(A) ⊗ Π(G),      solve:  V ↦ (Π(G) + λI)⁻¹ V (Π(A) + λI)⁻¹,

KFAC's factors restricted to the structure, damped per factor with the same ``λ``
(SINGD's rule: ``(Π(A) + λI) ⊗ (Π(G) + λI) = C_l + λ(Π(A) ⊗ I + I ⊗ Π(G)) + λ²I``).
The hierarchical pattern is not closed under transposition, its fixed point has no
closed form, and it is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen, LayerFactors
from curvlab.errors import OptionError
from curvlab.numerics import compute_dtype
from curvlab.optim.structures import BlockDiagonal, Dense, Diagonal, Structure, as_structure

CLOSED_STRUCTURES = (Dense, Diagonal, BlockDiagonal)


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


class SINGDCurvature(LayerwiseCurvature):
    """Block-diagonal one-batch SINGD (IKFAC) matrix for a structure.

    Args:
        capture: The capture to read.
        structure: ``"dense"``, ``"diagonal"``, ``"block_diagonal"`` or a
            :class:`~curvlab.optim.structures.Structure` of those kinds.

    Raises:
        ValueError: a structure that is not closed under transposition (hierarchical).
    """

    def __init__(self, capture: Capture, structure: str | Structure = "dense"):
        struct = as_structure(structure)
        if not isinstance(struct, CLOSED_STRUCTURES):
            raise OptionError(
                f"one-batch SINGD needs a structure closed under transposition (dense, "
                f"diagonal, block_diagonal), not '{struct.name}': its IKFAC fixed point has "
                "no closed form; train with curvlab.optim.SINGD instead"
            )
        self.structure = struct
        dtype = compute_dtype(capture.dtype)
        super().__init__(
            {
                lc.name: SINGDBlock(LayerFactors.of(lc, capture.scale), struct, dtype)
                for lc in capture.layers
            }
        )

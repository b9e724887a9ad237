"""EKFAC (George et al. 2018): KFAC's eigenbasis with exact eigenvalues.

Per layer, with the KFAC eigenbases ``Q_A``, ``Q_G`` and the per-(sample, column)
gradients ``Γ_nc = Σ_t e_nct ā_ntᵀ`` (``d_out x d_in_h``):

    C_l = (Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ,   S = s Σ_{n,c} (Q_Gᵀ Γ_nc Q_A)²  (elementwise),

i.e. ``S`` is the diagonal of the exact layer block in the KFAC eigenbasis — the best
diagonal approximation there.  ``solve(v, λ) = (C_l + λI)⁻¹ v``.  Grouped convolutions:
one such block per group, in the group's KFAC eigenbasis.  Layers without
Kronecker factors (``LayerKind.kronecker`` false) get their exact block
(:class:`~curvlab.curvature.exact.GramFisher`).
"""

from __future__ import annotations

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.columns import eigenbasis_second_moment
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.exact import exact_block
from curvlab.curvature.factors import LayerFactors
from curvlab.curvature.grouped import GroupedBlock
from curvlab.independence import require_independent
from curvlab.numerics import compute_dtype

__all__ = ["EKFAC", "eigenbasis_second_moment"]


class EKFAC(LayerwiseCurvature):
    """Eigenvalue-corrected KFAC; one :class:`EigenBlock` per layer."""

    def __init__(self, capture: Capture):
        require_independent(
            capture.coupling, "EKFAC (its eigenvalues are exact per-sample moments)"
        )
        dtype = compute_dtype(capture.dtype)
        blocks: dict[str, Curvature] = {}

        def ekfac_block(lc: LayerCapture) -> EigenBlock:
            f = LayerFactors.of(lc, capture.scale)
            q_g, q_a = f.eig_G.vectors, f.eig_A.vectors
            s = eigenbasis_second_moment(lc, q_g, q_a, capture.scale)
            return EigenBlock(lc.info, q_g, q_a, s, dtype)

        for lc in capture.layers:
            if lc.info.kronecker:
                blocks[lc.name] = ekfac_block(lc)
            elif lc.groups is not None:
                blocks[lc.name] = GroupedBlock.of(lc, ekfac_block)
            else:
                blocks[lc.name] = exact_block(capture, lc)
        super().__init__(blocks)

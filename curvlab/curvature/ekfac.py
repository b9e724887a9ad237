"""EKFAC (George et al. 2018): KFAC's eigenbasis with exact eigenvalues.

Per layer, with the KFAC eigenbases ``Q_A``, ``Q_G`` and the per-(sample, column)
gradients ``Γ_nc = Σ_t e_nct ā_ntᵀ`` (``d_out x d_in_h``):

    C_l = (Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ,   S = s Σ_{n,c} (Q_Gᵀ Γ_nc Q_A)²  (elementwise),

i.e. ``S`` is the diagonal of the exact layer block in the KFAC eigenbasis — the best
diagonal approximation there.  ``solve(v, λ) = (C_l + λI)⁻¹ v``.  Layers without
Kronecker factors (``LayerKind.kronecker`` false) get their exact block
(:class:`~curvlab.curvature.exact.GramFisher`).
"""

from __future__ import annotations

from curvlab.capture import Capture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.columns import eigenbasis_second_moment
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.exact import GramFisher
from curvlab.curvature.factors import LayerFactors
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
        for lc in capture.layers:
            if not lc.info.kronecker:
                blocks[lc.name] = GramFisher(capture, [lc])
                continue
            f = LayerFactors.of(lc, capture.scale)
            q_g, q_a = f.eig_G.vectors, f.eig_A.vectors
            s = eigenbasis_second_moment(lc, q_g, q_a, capture.scale)
            blocks[lc.name] = EigenBlock(lc.info, q_g, q_a, s, dtype)
        super().__init__(blocks)

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

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.config import options
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.exact import GramFisher
from curvlab.curvature.factors import LayerFactors
from curvlab.curvature.gram import per_sample_gradients
from curvlab.numerics import SOLVE_DTYPE, compute_dtype


def eigenbasis_second_moment(lc: LayerCapture, q_g: Tensor, q_a: Tensor, scale: float) -> Tensor:
    """``s Σ_{n,c} (Q_Gᵀ Γ_nc Q_A)²`` of shape ``(d_out, d_in_h)``, chunked over samples."""
    dtype = compute_dtype(lc.a.dtype)
    a = lc.a.to(dtype) @ q_a.to(dtype)  # (N, T, d_in_h)
    e = lc.e.to(dtype) @ q_g.to(dtype)  # (C', N, T, d_out)
    c, n, _, o = e.shape
    per_sample = c * o * a.shape[-1] * a.element_size()
    step = max(1, options.chunk_bytes // per_sample)
    out = torch.zeros(o, a.shape[-1], dtype=SOLVE_DTYPE, device=a.device)
    for i in range(0, n, step):
        g = per_sample_gradients(a[i : i + step], e[:, i : i + step].permute(1, 0, 2, 3))
        out += g.square().sum(dim=(0, 1)).to(SOLVE_DTYPE)
    return scale * out


class EKFAC(LayerwiseCurvature):
    """Eigenvalue-corrected KFAC; one :class:`EigenBlock` per layer."""

    def __init__(self, capture: Capture):
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

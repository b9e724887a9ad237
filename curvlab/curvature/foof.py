"""FOOF (Benzing 2022): precondition with the input factor ``A`` alone.

Per layer ``C_l = A ⊗ I`` (dense block ``kron(I_{d_out}, A)`` in the row-major
``[W | b]`` layout), so ``solve`` gives ``ΔW̄ = ∇W̄ (A + λI)⁻¹``.  ``A`` is the KFAC
input factor (:mod:`curvlab.curvature.factors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen, input_factor
from curvlab.layers import LayerInfo
from curvlab.numerics import compute_dtype


def foof_block(info: LayerInfo, a_factor: Tensor, dtype: torch.dtype) -> EigenBlock:
    """The block ``A ⊗ I`` of one layer from its input factor ``A (d_in_h, d_in_h)``."""
    eig = Eigen.of(a_factor, f"the input factor A of layer '{info.name}'")
    ones = torch.ones(info.d_out, 1, dtype=eig.values.dtype, device=eig.values.device)
    return EigenBlock(info, None, eig.vectors, ones * eig.values, dtype)


class FOOF(LayerwiseCurvature):
    """Block-diagonal ``⊕_l A_l ⊗ I``; ``solve(v, λ)`` = ``V (A + λI)⁻¹`` per layer."""

    def __init__(self, capture: Capture):
        dtype = compute_dtype(capture.dtype)
        super().__init__(
            {lc.name: foof_block(lc.info, input_factor(lc.a), dtype) for lc in capture.layers}
        )

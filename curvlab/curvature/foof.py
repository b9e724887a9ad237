"""FOOF (Benzing 2022): precondition with the input factor ``A`` alone.

Per layer ``C_l = A ⊗ I`` (dense block ``kron(I_{d_out}, A)`` in the row-major
``[W | b]`` layout), so ``solve`` gives ``ΔW̄ = ∇W̄ (A + λI)⁻¹``.  ``A`` is the KFAC
input factor (:mod:`curvlab.curvature.factors`).
"""

from __future__ import annotations

import torch

from curvlab.capture import Capture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import Eigen, input_factor
from curvlab.numerics import compute_dtype


class FOOF(LayerwiseCurvature):
    """Block-diagonal ``⊕_l A_l ⊗ I``; ``solve(v, λ)`` = ``V (A + λI)⁻¹`` per layer."""

    def __init__(self, capture: Capture):
        dtype = compute_dtype(capture.dtype)
        blocks = {}
        for lc in capture.layers:
            eig = Eigen.of(input_factor(lc.a))
            ones = torch.ones(lc.info.d_out, 1, dtype=eig.values.dtype, device=eig.values.device)
            blocks[lc.name] = EigenBlock(lc.info, None, eig.vectors, ones * eig.values, dtype)
        super().__init__(blocks)

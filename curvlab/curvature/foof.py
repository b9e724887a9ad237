"""FOOF (Benzing 2022): precondition with the input factor ``A`` alone.

Per layer ``C_l = A ⊗ I`` (dense block ``kron(I_{d_out}, A)`` in the row-major
``[W | b]`` layout); ``A`` is the KFAC input factor (:mod:`curvlab.curvature.factors`).
Two damping rules for the same matrix:

* ``"plain"``: ``ΔW̄ = ∇W̄ (A + λI)⁻¹`` (DESIGN.md);
* ``"heuristic"``: ``ΔW̄ = ∇W̄ (A + π√λ I)⁻¹`` with KFAC's
  ``π = sqrt((tr A / dim A) / (tr G / dim G))`` from the same ``A`` and ``G`` — KFAC's own
  A-side damping, i.e. "KFAC without G", the FOOF of Benzing's Fig. 3 and 4 (App. D.9).

Grouped convolutions: one such block per group (``A_g ⊗ I``).  Layers without Kronecker
factors (``LayerKind.kronecker`` false) get their exact block instead
(:class:`~curvlab.curvature.exact.GramFisher`, from the capture's Fisher columns).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.exact import exact_block
from curvlab.curvature.factors import Eigen, LayerFactors, input_factor
from curvlab.curvature.grouped import GroupedBlock
from curvlab.layers import LayerKind
from curvlab.numerics import check_choice, compute_dtype

FOOF_DAMPING_MODES = ("plain", "heuristic")


class FOOFBlock(EigenBlock):
    """One layer's ``A ⊗ I``, damped as ``A + λI`` (``pi=None``) or ``A + π√λ I``.

    Attributes:
        pi: KFAC's heuristic ``π`` of the layer, or ``None`` for plain damping.
    """

    def __init__(self, info: LayerKind, eig: Eigen, dtype: torch.dtype, pi: float | None = None):
        ones = torch.ones(info.d_out, 1, dtype=eig.values.dtype, device=eig.values.device)
        super().__init__(info, None, eig.vectors, ones * eig.values, dtype, kronecker_factored=True)
        self.pi = pi

    def denominator(self, damping: float) -> Tensor:
        if self.pi is None:
            return super().denominator(damping)
        return self.d + self.pi * math.sqrt(damping)


def foof_block(
    info: LayerKind, a_factor: Tensor, dtype: torch.dtype, pi: float | None = None
) -> FOOFBlock:
    """The block ``A ⊗ I`` of one layer from its input factor ``A (d_in_h, d_in_h)``;
    ``pi`` switches on the heuristic damping ``A + π√λ I``."""
    eig = Eigen.of(a_factor, f"the input factor A of layer '{info.name}'")
    return FOOFBlock(info, eig, dtype, pi)


def exact_layer_block(info: LayerKind, g_factor: Tensor, dtype: torch.dtype) -> EigenBlock:
    """The exact block of a layer without Kronecker factors (``A = 1``) from its
    "gradient factor" ``G`` (the exact block, ``(P_l, P_l)``), as an eigenbasis block."""
    eig = Eigen.of(g_factor, f"the curvature block of layer '{info.name}'")
    one = torch.ones(1, 1, dtype=eig.values.dtype, device=eig.values.device)
    return EigenBlock(info, eig.vectors, one, eig.values.unsqueeze(1), dtype)


class FOOF(LayerwiseCurvature):
    """Block-diagonal ``⊕_l A_l ⊗ I``; ``solve(v, λ)`` = ``V (A + λI)⁻¹`` per layer, or
    ``V (A + π_l√λ I)⁻¹`` with ``damping_mode="heuristic"`` (module docstring); the exact
    block, damped as ``C_l + λI``, for layers without Kronecker factors.

    Args:
        capture: The capture to read (its output gradients give ``G`` for ``π``).
        damping_mode: ``"plain"`` (default) or ``"heuristic"``.
    """

    def __init__(self, capture: Capture, damping_mode: str = "plain"):
        check_choice("damping_mode", damping_mode, FOOF_DAMPING_MODES)
        self.damping_mode = damping_mode
        dtype = compute_dtype(capture.dtype)
        blocks: dict[str, Curvature] = {}

        def block(lc: LayerCapture) -> FOOFBlock:
            if damping_mode == "plain":
                return foof_block(lc.info, input_factor(lc.a), dtype)
            factors = LayerFactors.of(lc, capture.scale)
            return FOOFBlock(lc.info, factors.eig_A, dtype, factors.pi)

        for lc in capture.layers:
            if lc.info.kronecker:
                blocks[lc.name] = block(lc)
            elif lc.groups is not None:
                blocks[lc.name] = GroupedBlock.of(lc, block)
            else:
                blocks[lc.name] = exact_block(capture, lc)
        super().__init__(blocks)

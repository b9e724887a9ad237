"""KFAC (Martens & Grosse 2015) and KFC "expand" for convolutions (Grosse & Martens 2016).

Per layer ``C_l = A ⊗ G`` (dense block ``kron(G, A)`` in the row-major ``[W | b]``
layout; factors in :mod:`curvlab.curvature.factors`).  Weight and bias form one block.
Grouped convolutions get one factor pair ``A_g ⊗ G_g`` per group
(:class:`~curvlab.curvature.grouped.GroupedBlock`).  Layers whose kind has no Kronecker
factors (``LayerKind.kronecker`` false: norms, PReLU, generic modules) get their exact
block (:class:`~curvlab.curvature.exact.GramFisher`),
damped as ``C_l + λI`` whatever the damping mode; ``KFAC(...).layer_structure`` says
which layer is which.

Damping (DESIGN.md):

* ``"standard"``: ``(A ⊗ G + λI)⁻¹`` exactly, through the eigendecompositions of A, G:
  ``V ↦ Q_G [(Q_Gᵀ V Q_A) / (s_G s_Aᵀ + λ)] Q_Aᵀ``.
* ``"heuristic"``: factored Tikhonov ``(G + √λ/π I)⁻¹ V (A + π√λ I)⁻¹`` with
  ``π = sqrt((tr A / dim A) / (tr G / dim G))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.exact import exact_block
from curvlab.curvature.factors import KFAC_APPROX, LayerFactors
from curvlab.curvature.grouped import GroupedBlock
from curvlab.numerics import check_choice, compute_dtype

DAMPING_MODES = ("heuristic", "standard")


class KFACBlock(EigenBlock):
    """One layer's ``A ⊗ G`` with its damping rule.

    Attributes:
        factors: The layer's :class:`~curvlab.curvature.factors.LayerFactors`.
        damping_mode: ``"heuristic"`` or ``"standard"``.
    """

    def __init__(self, factors: LayerFactors, damping_mode: str, dtype: torch.dtype):
        ea, eg = factors.eig_A, factors.eig_G
        super().__init__(
            factors.info,
            eg.vectors,
            ea.vectors,
            torch.outer(eg.values, ea.values),
            dtype,
            kronecker_factored=True,
        )
        self.factors, self.damping_mode = factors, damping_mode

    def denominator(self, damping: float) -> Tensor:
        if self.damping_mode == "standard" or damping == 0 or not self.info.kronecker:
            return super().denominator(damping)
        pi = self.factors.pi
        root = math.sqrt(damping)
        return torch.outer(
            self.factors.eig_G.values + root / pi, self.factors.eig_A.values + pi * root
        )

    def cross_terms_norm(self, damping: float) -> Tensor:
        """``‖π√λ I ⊗ G + A ⊗ (√λ/π) I‖_F``: what heuristic damping adds beyond ``λI``.

        Computed in the eigenbasis, where both terms are diagonal.
        """
        pi, root = self.factors.pi, math.sqrt(damping)
        eig_g, eig_a = self.factors.eig_G.values, self.factors.eig_A.values
        cross = (pi * root * eig_g).unsqueeze(1) + (root / pi * eig_a).unsqueeze(0)
        return torch.linalg.vector_norm(cross).to(self.dtype)

    def damping_excess(self, damping: float) -> Tensor | None:
        """Heuristic damping: :meth:`cross_terms_norm`; standard damping, and layers
        without Kronecker factors (always damped with ``λI``): ``None``."""
        if self.damping_mode != "heuristic" or not self.info.kronecker:
            return None
        return self.cross_terms_norm(damping)


class KFAC(LayerwiseCurvature):
    """Block-diagonal Kronecker-factored curvature ``⊕_l A_l ⊗ G_l``.

    Args:
        capture: The capture to read (its Fisher type sets G's kind).
        damping_mode: ``"heuristic"`` (factored Tikhonov, default) or ``"standard"``
            (exact ``(A ⊗ G + λI)⁻¹``); ``solve`` follows it.
        kfac_approx: ``"expand"`` (KFC, default) or ``"reduce"`` for layers with
            ``T > 1`` (conv, sequences); identical for plain Linear layers.
    """

    def __init__(
        self, capture: Capture, damping_mode: str = "heuristic", kfac_approx: str = "expand"
    ):
        check_choice("damping_mode", damping_mode, DAMPING_MODES)
        check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        self.damping_mode, self.kfac_approx = damping_mode, kfac_approx
        dtype = compute_dtype(capture.dtype)
        blocks: dict[str, Curvature] = {}

        def kfac_block(lc: LayerCapture) -> KFACBlock:
            factors = LayerFactors.of(lc, capture.scale, kfac_approx)
            return KFACBlock(factors, damping_mode, dtype)

        for lc in capture.layers:
            if lc.info.kronecker:
                blocks[lc.name] = kfac_block(lc)
            elif lc.groups is not None:
                blocks[lc.name] = GroupedBlock.of(lc, kfac_block)
            else:
                blocks[lc.name] = exact_block(capture, lc)
        super().__init__(blocks)

    @property
    def factors(self) -> dict[str, LayerFactors]:
        """Kronecker-factored layer name -> its ``A`` and ``G`` (float64); a grouped
        layer's groups appear as ``'name[group g]'``."""
        out = {}
        for name, b in self._blocks.items():
            if isinstance(b, KFACBlock):
                out[name] = b.factors
            elif isinstance(b, GroupedBlock):
                out.update({k: g.factors for k, g in b.group_blocks.items()})
        return out

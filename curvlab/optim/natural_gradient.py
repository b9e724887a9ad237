"""Exact subsampled natural gradient (Benzing 2022, App. I) as an optimizer.

Each step captures the curvature batch and solves with the exact Fisher of that batch
through Woodbury (:class:`curvlab.ExactFisher`, or :class:`curvlab.BlockDiagFisher` for
``structure="block_diagonal"``):

    d = (F_B + λI)⁻¹ g,     F_B = s Σ_{n,c} J_nᵀ g_nc g_ncᵀ J_n   (batch B),

so one step without momentum, weight decay or clipping is
``θ ← θ − lr · ExactFisher(capture).solve(capture.grad, λ)``.  By default ``B`` is the
gradient's own mini-batch; ``step(..., curvature_batch=(x, y))`` estimates ``F`` on an
independent batch instead (App. I.5: then ``F̂⁻¹`` and ``ĝ`` are independent, which
removes the bias of estimating both from the same samples).  The Gram matrix is
rebuilt at every step and released after it.  When ``B`` is the gradient's own batch,
``solve`` receives the capture's own gradient and runs as ``natural_gradient(λ)`` (the
same vector, computed from the gradient's output rows with fewer ``P``-sized products).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.exact import BlockDiagFisher, ExactFisher
from curvlab.numerics import check_choice
from curvlab.optim.base import CurvatureOptimizer

STRUCTURES = ("full", "block_diagonal")


class NaturalGradient(CurvatureOptimizer):
    """Natural-gradient descent with the exact damped Fisher of a mini-batch.

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        lr: Learning rate.
        damping: ``λ`` > 0.
        fisher: ``"mc"`` (sampled labels, default), ``"exact"`` (type-2 Fisher = GGN)
            or ``"empirical"``.
        mc_samples: Sampled labels per input for ``"mc"``.
        structure: ``"full"`` (all cross-layer terms) or ``"block_diagonal"``.
        momentum: Heavy-ball momentum on the preconditioned direction.
        weight_decay: ``wd·θ`` added to the preconditioned direction.
        kl_clip: ``κ`` of the KL clipping (:mod:`curvlab.optim.base`), or ``None``.
        generator: Random generator for the ``"mc"`` labels.
        memory_budget: Bytes the Gram matrix may take (default: curvlab's budget).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        fisher: str = "mc",
        mc_samples: int = 1,
        structure: str = "full",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        generator: torch.Generator | None = None,
        memory_budget: int | None = None,
    ):
        check_choice("structure", structure, STRUCTURES)
        self.structure, self.memory_budget = structure, memory_budget
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip
        )
        super().__init__(model, loss_fn, defaults, fisher, mc_samples, generator)
        self._fisher: ExactFisher | BlockDiagFisher | None = None

    def _wants_curvature(self, k: int) -> bool:
        return True

    def _update_curvature(self, capt: Capture, k: int) -> None:
        kind = ExactFisher if self.structure == "full" else BlockDiagFisher
        self._fisher = kind(capt, memory_budget=self.memory_budget)

    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        fisher, self._fisher = self._fisher, None
        return fisher.solve(grad, group["damping"])

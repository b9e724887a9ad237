"""FOOF as an optimizer (Benzing 2022): precondition with the input factor alone.

Per layer ``ΔW̄ = ∇W̄ (Â + λI)⁻¹`` with ``Â`` the bias-corrected moving average of the
KFAC input factor ``A = Σ ā āᵀ/(N T)``; the block is the one of :class:`curvlab.FOOF`
(:class:`~curvlab.curvature.foof.FOOFBlock`).  With ``damping_mode="plain"`` ``A`` needs
only the forward pass: the capture runs with ``fisher="empirical"`` (one Fisher
column, its output gradients unused).  With ``damping_mode="heuristic"`` the direction is
``∇W̄ (Â + π√λ I)⁻¹`` with KFAC's ``π`` from ``Â`` and the moving average ``Ĝ`` of KFAC's
gradient factor (``fisher``, ``"mc"`` by default, as KFAC's): "KFAC without G", the FOOF
of Benzing's Fig. 3 and 4.  With ``ema_decay=0`` (or on the first step),
``inverse_every=1``, no momentum, weight decay or clipping, one step is
``θ ← θ − lr · curvlab.FOOF(capture, damping_mode).solve(capture.grad, λ)``.  Layers
without Kronecker factors (``LayerKind.kronecker`` false) are preconditioned with the
moving average of their exact block of the capture's Fisher instead, ``(Ĝ + λI)⁻¹ g``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import LayerFactors, grad_factor, input_factor
from curvlab.curvature.foof import FOOF_DAMPING_MODES, FOOFBlock, exact_layer_block, foof_block
from curvlab.layers import LayerKind
from curvlab.numerics import check_choice
from curvlab.optim.kronecker import KroneckerOptimizer, StatKey


class FOOF(KroneckerOptimizer):
    """First-order optimisation of neurons' outputs: ``∇W̄ (Â + λI)⁻¹`` per layer
    (``∇W̄ (Â + π√λ I)⁻¹`` with ``damping_mode="heuristic"``).

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        lr: Learning rate.
        damping: ``λ``.
        damping_mode: ``"plain"`` (default) or ``"heuristic"`` (module docstring).
        fisher: Fisher type of ``G`` for the heuristic damping (unused with ``"plain"``).
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        ema_decay: Decay of ``A``'s moving average (0.95; 0 = latest batch only).
        inverse_every: ``T``, steps between eigendecompositions of ``Â``.
        stats_steps: ``S``, updates of ``A`` before each of them (``None`` = every step).
        momentum: Heavy-ball momentum on the preconditioned direction.
        weight_decay: ``wd·θ`` added to the preconditioned direction.
        kl_clip: ``κ`` of the KL clipping (:mod:`curvlab.optim.base`), or ``None``.
        generator: Random generator for the ``"mc"`` labels.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        damping_mode: str = "plain",
        fisher: str = "mc",
        mc_samples: int = 1,
        ema_decay: float = 0.95,
        inverse_every: int = 1,
        stats_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        generator: torch.Generator | None = None,
    ):
        check_choice("damping_mode", damping_mode, FOOF_DAMPING_MODES)
        self.damping_mode = damping_mode
        if damping_mode == "plain":
            fisher = "empirical"
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip
        )
        super().__init__(
            model,
            loss_fn,
            defaults,
            ema_decay,
            inverse_every,
            stats_steps,
            fisher,
            mc_samples,
            generator,
        )

    @property
    def input_factors(self) -> dict[str, Tensor]:
        """Layer name -> the bias-corrected ``Â`` in use (float64)."""
        return {owner: v for (owner, name), v in self.statistics.items() if name == "A"}

    def _statistics(self, capt: Capture) -> dict[StatKey, Tensor]:
        out: dict[StatKey, Tensor] = {}
        for lc in capt.layers:
            if not lc.info.kronecker:
                out[lc.name, "G"] = grad_factor(lc.e, capt.scale)
                continue
            out[lc.name, "A"] = input_factor(lc.a)
            if self.damping_mode == "heuristic":
                out[lc.name, "G"] = grad_factor(lc.e, capt.scale)
        return out

    def _block(self, info: LayerKind, stats: dict[str, Tensor]) -> EigenBlock:
        if not info.kronecker:
            return exact_layer_block(info, stats["G"], self.block_dtype)
        if self.damping_mode == "plain":
            return foof_block(info, stats["A"], self.block_dtype)
        factors = LayerFactors(info, stats["A"], stats["G"])
        return FOOFBlock(info, factors.eig_A, self.block_dtype, factors.pi)

"""FOOF as an optimizer (Benzing 2022): precondition with the input factor alone.

Per layer ``ΔW̄ = ∇W̄ (Â + λI)⁻¹`` with ``Â`` the bias-corrected moving average of the
KFAC input factor ``A = Σ ā āᵀ/(N T)``; the block is the one of :class:`curvlab.FOOF`
(:class:`~curvlab.curvature.eigen_block.EigenBlock` with ``Q_out = I``).  ``A`` needs
only the forward pass: the capture runs with ``fisher="empirical"`` (one Fisher
column, its output gradients unused).  With ``ema_decay=0`` (or on the first step),
``inverse_every=1``, no momentum, weight decay or clipping, one step is
``θ ← θ − lr · curvlab.FOOF(capture).solve(capture.grad, λ)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.factors import input_factor
from curvlab.curvature.foof import foof_block
from curvlab.layers import LayerInfo
from curvlab.optim.kronecker import KroneckerOptimizer, StatKey


class FOOF(KroneckerOptimizer):
    """First-order optimisation of neurons' outputs: ``∇W̄ (Â + λI)⁻¹`` per layer.

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        lr: Learning rate.
        damping: ``λ``.
        ema_decay: Decay of ``A``'s moving average (0.95; 0 = latest batch only).
        inverse_every: ``T``, steps between eigendecompositions of ``Â``.
        stats_steps: ``S``, updates of ``A`` before each of them (``None`` = every step).
        momentum: Heavy-ball momentum on the preconditioned direction.
        weight_decay: ``wd·θ`` added to the preconditioned direction.
        kl_clip: ``κ`` of the KL clipping (:mod:`curvlab.optim.base`), or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        ema_decay: float = 0.95,
        inverse_every: int = 1,
        stats_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
    ):
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip
        )
        super().__init__(
            model, loss_fn, defaults, ema_decay, inverse_every, stats_steps, fisher="empirical"
        )

    @property
    def input_factors(self) -> dict[str, Tensor]:
        """Layer name -> the bias-corrected ``Â`` in use (float64)."""
        return {owner: v for (owner, name), v in self.statistics.items() if name == "A"}

    def _statistics(self, capt: Capture) -> dict[StatKey, Tensor]:
        return {(lc.name, "A"): input_factor(lc.a) for lc in capt.layers}

    def _block(self, info: LayerInfo, stats: dict[str, Tensor]) -> EigenBlock:
        return foof_block(info, stats["A"], self.block_dtype)

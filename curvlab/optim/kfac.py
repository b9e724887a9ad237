"""KFAC as an optimizer (Martens & Grosse 2015; KFC "expand" for convolutions).

Per layer the preconditioner is :class:`~curvlab.curvature.kfac.KFACBlock` — the block
of :class:`curvlab.KFAC` — built from the bias-corrected moving averages ``Â``, ``Ĝ`` of
the factors of :mod:`curvlab.curvature.factors` (``A = Σ ā āᵀ/(N T)``,
``G = s Σ e eᵀ``), so a step's direction is ``KFAC(Â, Ĝ).solve(g, λ)``:

* ``damping_mode="heuristic"``: ``(Ĝ + √λ/π I)⁻¹ ∇W̄ (Â + π√λ I)⁻¹`` (factored Tikhonov);
* ``damping_mode="standard"``: ``(Â ⊗ Ĝ + λI)⁻¹ g`` exactly (eigenbases of Â and Ĝ).

With ``ema_decay=0`` (or on the first step, thanks to the bias correction),
``inverse_every=1``, no momentum, no weight decay and no clipping, one step is
``θ ← θ − lr · curvlab.KFAC(capture).solve(capture.grad, λ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.factors import KFAC_APPROX, LayerFactors, grad_factor, input_factor
from curvlab.curvature.kfac import DAMPING_MODES, KFACBlock
from curvlab.layers import LayerKind
from curvlab.numerics import check_choice
from curvlab.optim.kronecker import KroneckerOptimizer, StatKey


class KFAC(KroneckerOptimizer):
    """Kronecker-factored natural-gradient optimizer.

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        lr: Learning rate.
        damping: ``λ``.
        damping_mode: ``"heuristic"`` (default) or ``"standard"`` (module docstring).
        fisher: Fisher type for ``G`` (``"mc"``, ``"exact"``, ``"empirical"``).
        mc_samples: Sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` (KFC, default) or ``"reduce"`` for layers with ``T > 1``.
        ema_decay: Decay of the factors' moving averages (0.95; 0 = latest batch only).
        inverse_every: ``T``, steps between eigendecompositions of the factors.
        stats_steps: ``S``, factor updates before each of them (``None`` = every step).
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
        damping_mode: str = "heuristic",
        fisher: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        ema_decay: float = 0.95,
        inverse_every: int = 1,
        stats_steps: int | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        generator: torch.Generator | None = None,
    ):
        check_choice("damping_mode", damping_mode, DAMPING_MODES)
        check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        self.damping_mode, self.kfac_approx = damping_mode, kfac_approx
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
    def factors(self) -> dict[str, LayerFactors]:
        """Layer name -> the bias-corrected ``Â``, ``Ĝ`` in use (float64)."""
        return {name: blk.factors for name, blk in self.preconditioner.blocks.items()}

    def _statistics(self, capt: Capture) -> dict[StatKey, Tensor]:
        out: dict[StatKey, Tensor] = {}
        for lc in capt.layers:
            out[lc.name, "A"] = input_factor(lc.a, self.kfac_approx)
            out[lc.name, "G"] = grad_factor(lc.e, capt.scale, self.kfac_approx)
        return out

    def _block(self, info: LayerKind, stats: dict[str, Tensor]) -> KFACBlock:
        factors = LayerFactors(info, stats["A"], stats["G"])
        return KFACBlock(factors, self.damping_mode, self.block_dtype)

"""Shared machinery of the amortised Kronecker-factored optimizers (KFAC, FOOF, two-level).

Statistics (per-layer factors such as ``A`` and ``G``, and network-wide ones such as the
coarse two-level matrices) are read from a capture on the steps the
:class:`~curvlab.optim.amortisation.Amortisation` schedule says, folded into
bias-corrected moving averages, and frozen ("in use") at each inversion step; the
preconditioner is the layer-wise curvature (:class:`~curvlab.curvature.base.
LayerwiseCurvature`) built from the frozen statistics with the same blocks as the
curvature objects (:class:`~curvlab.curvature.kfac.KFACBlock`,
:class:`~curvlab.curvature.eigen_block.EigenBlock`).  Its eigendecompositions are
computed once per inversion and reused until the next one.

Statistics are keyed ``(owner, name)``: ``owner`` is a layer name, or ``None`` for
network-wide statistics.  They are kept in float64 (as the factors are computed), under
``state["global"]``, so that ``load_state_dict`` does not cast them to the model's dtype.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.layers import LayerKind
from curvlab.numerics import compute_dtype
from curvlab.optim.amortisation import Amortisation, check_decay, debiased, ema_update
from curvlab.optim.base import GLOBAL, CurvatureOptimizer

StatKey = tuple[str | None, str]


class KroneckerOptimizer(CurvatureOptimizer):
    """Moving-average, amortised layer-wise preconditioner.

    Args:
        model, loss_fn: As for :class:`~curvlab.optim.base.CurvatureOptimizer`.
        defaults: The group's hyperparameters (``lr``, ``damping``, ``momentum``,
            ``weight_decay``, ``kl_clip``; see :mod:`curvlab.optim.base`).
        ema_decay: ``ρ`` of the bias-corrected moving averages (0 = latest batch only).
        inverse_every: ``T``, steps between preconditioner rebuilds.
        stats_steps: ``S``, statistics updates before each rebuild (``None`` = every step).
        fisher, mc_samples, generator: Fisher type of the captures.

    Subclasses implement :meth:`_statistics` and :meth:`_block`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        defaults: dict[str, Any],
        ema_decay: float,
        inverse_every: int,
        stats_steps: int | None,
        fisher: str,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ):
        self.schedule = Amortisation(inverse_every, stats_steps)
        self.ema_decay = check_decay(ema_decay)
        super().__init__(model, loss_fn, defaults, fisher, mc_samples, generator)
        self._preconditioner: LayerwiseCurvature | None = None

    # ------------------------------------------------------------------------------
    # what subclasses provide
    # ------------------------------------------------------------------------------

    @abstractmethod
    def _statistics(self, capt: Capture) -> dict[StatKey, Tensor]:
        """The statistics of one capture, keyed ``(layer name or None, name)``."""

    @abstractmethod
    def _block(self, info: LayerKind, stats: dict[str, Tensor]) -> Curvature:
        """One layer's curvature block from its in-use statistics (by name)."""

    # ------------------------------------------------------------------------------
    # schedule, averages, preconditioner
    # ------------------------------------------------------------------------------

    @property
    def stats_updates(self) -> int:
        """How many captures have been folded into the moving averages."""
        return self.state[GLOBAL].get("stats_updates", 0)

    @property
    def inversions(self) -> int:
        """How many times the preconditioner has been rebuilt."""
        return self.state[GLOBAL].get("inversions", 0)

    @property
    def statistics(self) -> dict[StatKey, Tensor]:
        """The bias-corrected statistics in use (frozen at the last inversion)."""
        if "in_use" not in self.state[GLOBAL]:
            raise RuntimeError("no preconditioner yet: call step() first.")
        return dict(self.state[GLOBAL]["in_use"])

    @property
    def preconditioner(self) -> LayerwiseCurvature:
        """The curvature in use: one block per layer, built from :attr:`statistics`."""
        if self._preconditioner is None:
            stats = self.statistics
            blocks = {}
            for info in self.layers:
                mine = {name: v for (owner, name), v in stats.items() if owner == info.name}
                blocks[info.name] = self._block(info, mine)
            self._preconditioner = LayerwiseCurvature(blocks)
        return self._preconditioner

    @property
    def block_dtype(self) -> torch.dtype:
        """Dtype of the blocks' results (the compute dtype of the model's dtype)."""
        return compute_dtype(self.dtype)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._preconditioner = None

    def _wants_curvature(self, k: int) -> bool:
        return self.schedule.updates_stats(k)

    def _update_curvature(self, capt: Capture, k: int) -> None:
        state = self.state[GLOBAL]
        averages = dict(state.get("averages", {}))
        for key, value in self._statistics(capt).items():
            averages[key] = ema_update(averages.get(key), value, self.ema_decay)
        state["averages"] = averages
        state["stats_updates"] = count = self.stats_updates + 1
        if self.schedule.inverts(k):
            state["in_use"] = {
                key: debiased(avg, self.ema_decay, count) for key, avg in averages.items()
            }
            state["inversions"] = self.inversions + 1
            self._preconditioner = None

    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        return self.preconditioner.solve(grad, group["damping"])

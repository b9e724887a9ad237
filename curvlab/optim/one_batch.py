"""Any registered curvature as an optimizer: rebuilt from each mini-batch's capture.

:class:`OneBatchCurvature` turns a curvature builder (a method of the registry,
:mod:`curvlab.methods`) into a step

    d = C_B.solve(g, λ),     θ ← θ − lr · d     (plus the shared momentum, weight decay
                                                  and KL clipping of :mod:`curvlab.optim.base`),

where ``C_B`` is the method's curvature built from the capture of the current batch
(no moving averages, no amortisation), with the method's own damping rule.  This is how
``curvlab train`` runs every method that has no dedicated optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.base import Curvature
from curvlab.optim.base import CurvatureOptimizer


@dataclass
class CapturedBatch:
    """What a curvature builder reads: the problem and its capture (the attributes of
    :class:`curvlab.compare.Analysis` that builders use)."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor
    capture: Capture


class OneBatchCurvature(CurvatureOptimizer):
    """Steps with ``build(batch).solve(g, λ)`` for the curvature of each batch.

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        build: ``CapturedBatch -> Curvature`` (a registry method's builder).
        lr: Learning rate.
        damping: ``λ`` > 0, passed to the curvature's ``solve``.
        fisher: Fisher type of the captures (``"mc"``, ``"exact"``, ``"empirical"``).
        mc_samples: Sampled labels per input for ``"mc"``.
        momentum, weight_decay, kl_clip: As in :mod:`curvlab.optim.base`.
        generator: Random generator for the ``"mc"`` labels.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        build: Callable[[CapturedBatch], Curvature | None],
        lr: float = 0.1,
        damping: float = 1e-3,
        fisher: str = "mc",
        mc_samples: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, kl_clip=kl_clip
        )
        super().__init__(model, loss_fn, defaults, fisher, mc_samples, generator)
        self.build = build
        self._batch: tuple[Tensor, Tensor] | None = None
        self._curvature: Curvature | None = None

    def _capture(self, inputs: Tensor, targets: Tensor) -> Capture:
        self._batch = (inputs, targets)
        return super()._capture(inputs, targets)

    def _wants_curvature(self, k: int) -> bool:
        return True

    def _update_curvature(self, capt: Capture, k: int) -> None:
        self._curvature = self.build(CapturedBatch(self.model, self.loss_fn, *self._batch, capt))

    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        curv, self._curvature = self._curvature, None
        if curv is None:
            return grad
        return curv.solve(grad, group["damping"])

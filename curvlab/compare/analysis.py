"""One capture and everything a comparison derives from it, built once and cached.

:class:`Analysis` holds the problem (model, loss, batch), the one
:class:`~curvlab.capture.Capture` and, on demand, each method's curvature object
and update directions ``d(λ)``.  Every metric module reads from it, so a
comparison captures (forward and batched backward) exactly once; beyond that only
the progress section evaluates the loss at shifted parameters (forward passes without
autograd, on cloned buffers).

The model must keep its samples independent and its forward pass repeatable: train-mode
BatchNorm (or any module mixing the batch) and train-mode Dropout are refused with
:class:`~curvlab.errors.SampleCouplingError`; call ``model.eval()`` first.

Per-layer exact blocks come from one cached :class:`~curvlab.BlockDiagFisher`, so
each layer's Gram matrix is assembled once however many metrics use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture, capture
from curvlab.compare.methods import METHODS
from curvlab.curvature import BlockDiagFisher, Curvature, ExactFisher
from curvlab.independence import require_deterministic, require_independent
from curvlab.records import NETWORK


class Analysis:
    """A captured problem and its cached curvature objects and directions.

    Args:
        model, loss_fn, inputs, targets: The problem (see :func:`curvlab.capture`).
        fisher: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Sampled labels per input for ``"mc"``.
        generator: Random generator for ``"mc"``.

    Attributes:
        capture: The one capture everything is computed from.
        layer_names: Captured layer names in flat-layout order.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        fisher: str = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ):
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        require_deterministic(model, "the comparison")
        self.capture: Capture = capture(
            model, loss_fn, inputs, targets, fisher, mc_samples, generator
        )
        require_independent(self.capture.coupling, "the comparison")
        self.layer_names = [lc.name for lc in self.capture.layers]
        self._curvatures: dict[str, Curvature | None] = {}
        self._directions: dict[tuple[str, float], Tensor] = {}
        self._memo: dict[Any, Any] = {}

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, evaluated once per ``key`` (derived quantities shared by sections)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def curvature(self, method: str) -> Curvature | None:
        """The curvature object of ``method`` (``None`` for ``sgd``), built once."""
        if method not in self._curvatures:
            self._curvatures[method] = METHODS[method].build(self)
        return self._curvatures[method]

    @property
    def exact(self) -> ExactFisher:
        """The full-network Fisher/GGN ``F``."""
        return self.curvature("exact")  # type: ignore[return-value]

    @property
    def blockdiag(self) -> BlockDiagFisher:
        """The exact per-layer blocks ``F_ll``."""
        return self.curvature("blockdiag")  # type: ignore[return-value]

    def block(self, method: str, layer: str) -> Curvature | None:
        """``method``'s curvature restricted to ``layer``'s diagonal block.

        For ``exact`` this is the cached exact block ``F_ll`` (the same matrix as
        ``blockdiag``'s block), so no layer Gram is assembled twice.
        """
        if METHODS[method].matrix == "exact":
            method = "blockdiag"
        curv = self.curvature(method)
        return None if curv is None else curv.blocks[layer]

    def direction(self, method: str, damping: float) -> Tensor:
        """``d(λ)``, the update direction of ``method`` for the mini-batch gradient (flat,
        float64)."""
        key = (method, float(damping))
        if key not in self._directions:
            curv = self.curvature(method)
            g = self.capture.grad
            d = g if curv is None else curv.solve(g, damping)
            self._directions[key] = d.detach().to(torch.float64)
        return self._directions[key]

    def layer_part(self, v: Tensor, layer: str) -> Tensor:
        """The slice of flat vector ``v`` that belongs to ``layer`` (``NETWORK``: all)."""
        if layer == NETWORK:
            return v
        return v[self.capture.layers[self.layer_names.index(layer)].info.slice]

"""``nn.Linear``: ``W̄ = [W | b]`` acting on inputs ``(N, ..., d_in)``; the leading
dimensions after the batch are the locations ``T`` (``T = 1`` for 2-D inputs)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.layers.base import MatrixKind


class LinearKind(MatrixKind):
    """``nn.Linear`` (weight ``(d_out, d_in)``, optional bias)."""

    calls_as_locations = True

    def unfold(self, x: Tensor) -> Tensor:
        """``(N, ..., d_in)`` -> ``(N, T, d_in_h)`` with a trailing 1 for a bias."""
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def output_rows(self, g: Tensor) -> Tensor:
        return g.reshape(*g.shape[:2], -1, g.shape[-1])

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return tuple(out.shape[1:-1])

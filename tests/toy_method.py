"""A toy approximation registered at run time (used by tests/test_registry.py).

``C = c I`` with ``c = tr(F) / P`` (the multiple of the identity closest to ``F`` in
Frobenius norm), written only against the public :class:`curvlab.Curvature` interface:
no member beyond the abstract ones, so every comparison runs on the interface's
defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor

import curvlab

TOY = "toy-identity"
"""The toy's registry name."""


class ScaledIdentity(curvlab.Curvature):
    """``c I`` of size ``sizes`` summed, with one block per named layer."""

    def __init__(self, c: float, sizes: dict[str, int], device: torch.device, dtype: torch.dtype):
        self.c, self.sizes = c, sizes
        self.num_params = sum(sizes.values())
        self.device, self.dtype = device, dtype

    @property
    def blocks(self) -> dict[str, curvlab.Curvature]:
        if len(self.sizes) == 1:
            return {next(iter(self.sizes)): self}
        return {
            name: ScaledIdentity(self.c, {name: p}, self.device, self.dtype)
            for name, p in self.sizes.items()
        }

    def eigvalsh(self) -> Tensor:
        return torch.full((self.num_params,), self.c, dtype=self.dtype, device=self.device)

    def trace(self) -> Tensor:
        return torch.tensor(self.c * self.num_params, dtype=self.dtype)

    def frobenius_norm(self) -> Tensor:
        return torch.tensor(self.c * self.num_params**0.5, dtype=self.dtype)

    def _mv(self, v: Tensor) -> Tensor:
        return self.c * v

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        return v / (self.c + damping)

    def _dense(self) -> Tensor:
        return self.c * torch.eye(self.num_params, dtype=self.dtype, device=self.device)


def build(analysis) -> ScaledIdentity:
    capt = analysis.capture
    c = float(curvlab.BlockDiagFisher(capt).trace()) / capt.num_params
    sizes = {lc.name: lc.info.num_params for lc in capt.layers}
    return ScaledIdentity(c, sizes, capt.device, capt.dtype)


def register() -> None:
    """Register the toy as method ``toy-identity`` (idempotent)."""
    curvlab.register_method(TOY, "scaled identity tr(F)/P · I (toy)", build, replace=True)

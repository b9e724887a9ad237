"""One layer made of independent groups (grouped convolutions): a block per group.

A grouped layer's slice, reordered by its kind's ``group_order()``, is the groups'
slices one after the other (each in its own ``[W_g | b_g]`` layout); the layer block of a
Kronecker method is then ``P (⊕_g C_g) Pᵀ`` with one block ``C_g`` per group (KFAC:
``A_g ⊗ G_g``, from the group's patches and output-gradients in
``LayerCapture.groups``).  Spectra, traces, norms, ``⟨C, F⟩`` and ``UᵀCU`` are sums over
the groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab.capture import LayerCapture
from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.layers import LayerKind


class GroupedBlock(LayerwiseCurvature):
    """The block of one grouped layer from one block per group.

    Args:
        info: The grouped layer's kind (``group_layouts``, ``group_order()``).
        groups: The groups' blocks in group order, keyed by the groups' layout names.
    """

    def __init__(self, info: LayerKind, groups: dict[str, Curvature]):
        super().__init__(groups)
        self.info = info
        self._order = info.group_order().to(self.device)
        self._inverse = torch.argsort(self._order)

    @classmethod
    def of(cls, layer: LayerCapture, block: Callable[[LayerCapture], Curvature]) -> GroupedBlock:
        """``block`` built on each of ``layer.groups``."""
        return cls(layer.info, {g.name: block(g) for g in layer.groups})

    @property
    def structure(self) -> str:
        kinds = {b.structure for b in self._blocks.values()}
        return "kronecker" if kinds == {"kronecker"} else "exact"

    @property
    def blocks(self) -> dict[str, Curvature]:
        return {self.info.name: self}

    @property
    def group_blocks(self) -> dict[str, Curvature]:
        """The groups' blocks, by the groups' layout names."""
        return dict(self._blocks)

    def _pieces(self, v: Tensor) -> list[Tensor]:
        return super()._pieces(v[self._order])

    def _mv(self, v: Tensor) -> Tensor:
        return super()._mv(v)[self._inverse]

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        return super()._solve(v, damping)[self._inverse]

    def _dense(self) -> Tensor:
        return super()._dense()[self._inverse][:, self._inverse]

    def eigen_projections(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return super().eigen_projections(x[self._order], k)

    def _groups_of(self, layers: Sequence[LayerCapture]) -> list[LayerCapture]:
        (layer,) = layers
        return layer.groups

    def fisher_inner(self, layers: Sequence[LayerCapture], scale: float) -> float:
        """``Σ_g ⟨C_g, F_gg⟩``: the exact block's off-group parts meet zeros of ``C``."""
        return super().fisher_inner(self._groups_of(layers), scale)

    def column_products(self, layers: Sequence[LayerCapture]) -> Tensor:
        """``Σ_g U_gᵀ C_g U_g``."""
        return super().column_products(self._groups_of(layers))

    def eigenbasis_statistics(
        self, layer: LayerCapture, scale: float
    ) -> tuple[Tensor, Tensor] | None:
        """The groups' ``(D_g, S_g)`` stacked along the rows, ``(C_out, d_in_h)``; ``None``
        when a group's block has no Kronecker eigenbasis."""
        pairs = zip(self._blocks.values(), layer.groups)
        stats = [b.eigenbasis_statistics(g, scale) for b, g in pairs]
        if any(s is None for s in stats):
            return None
        return torch.cat([d for d, _ in stats]), torch.cat([s for _, s in stats])

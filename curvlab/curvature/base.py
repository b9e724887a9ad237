"""The one interface every curvature object shares, and its layer-wise composition.

A :class:`Curvature` is a symmetric positive semi-definite ``P x P`` matrix ``C``
over flat vectors (DESIGN.md layout).  Members: ``mv``, ``solve``, ``to_dense``,
``eigvalsh``, ``trace``, ``frobenius_norm``, ``blocks`` and ``as_linear_operator``.
Results come back in the compute dtype (the model's, float32 for half/bfloat16).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError
from curvlab.numerics import check_damping, check_vector


class Curvature(ABC):
    """Base class: a ``P x P`` curvature matrix ``C`` with the shared interface.

    Subclasses set ``num_params``, ``device`` and ``dtype`` and implement the
    ``_mv``/``_solve``/``_dense`` kernels on validated inputs.
    """

    num_params: int
    device: torch.device
    dtype: torch.dtype
    #: How the matrix treats its layers: ``"exact"`` or ``"kronecker"`` (factored).
    structure: str = "exact"

    def mv(self, v: Tensor) -> Tensor:
        """``C v`` for a flat vector ``v`` of shape ``(P,)``."""
        check_vector(v, self.num_params)
        return self._mv(v.to(self.device, self.dtype))

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """The damped preconditioned direction for ``v`` (``(C + λI)⁻¹ v`` unless the
        method defines its own damping rule; see the subclass)."""
        check_vector(v, self.num_params)
        lam = check_damping(damping, allow_zero=True)
        return self._solve(v.to(self.device, self.dtype), lam)

    def to_dense(self) -> Tensor:
        """The ``P x P`` matrix; refused above ``curvlab.config.options.memory_budget``."""
        need = self.num_params**2 * torch.finfo(torch.float64).bits // 8
        if need > options.memory_budget:
            raise MemoryBudgetError(
                f"a dense {self.num_params} x {self.num_params} matrix needs about "
                f"{format_bytes(need)}, over the memory budget of "
                f"{format_bytes(options.memory_budget)}. Use mv/solve/eigvalsh instead, "
                "look at .blocks, or raise curvlab.config.options.memory_budget."
            )
        return self._dense()

    def as_linear_operator(self) -> LinearOperator:
        """A scipy ``LinearOperator`` (float64 numpy in and out) computing ``C v``."""

        def matvec(x: np.ndarray) -> np.ndarray:
            v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.mv(v).detach().cpu().double().numpy()

        def matmat(x: np.ndarray) -> np.ndarray:
            return np.stack([matvec(col) for col in np.asarray(x).T], axis=1)

        n = self.num_params
        return LinearOperator(
            (n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np.float64
        )

    @property
    @abstractmethod
    def blocks(self) -> dict[str, Curvature]:
        """Per-layer views: layer name -> the curvature of that layer's block."""

    @abstractmethod
    def eigvalsh(self) -> Tensor:
        """Eigenvalues in ascending order (see the subclass for which ones)."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr C`` without forming ``C`` (0-d tensor)."""

    @abstractmethod
    def frobenius_norm(self) -> Tensor:
        """``‖C‖_F`` without forming ``C`` (0-d tensor)."""

    @abstractmethod
    def _mv(self, v: Tensor) -> Tensor: ...

    @abstractmethod
    def _solve(self, v: Tensor, damping: float) -> Tensor: ...

    @abstractmethod
    def _dense(self) -> Tensor: ...


class LayerwiseCurvature(Curvature):
    """Block-diagonal curvature: one block per layer, in flat-layout order.

    Args:
        blocks: Layer name -> block; the blocks' sizes add up to ``P`` in order.
    """

    def __init__(self, blocks: dict[str, Curvature]):
        self._blocks = blocks
        first = next(iter(blocks.values()))
        self.num_params = sum(b.num_params for b in blocks.values())
        self.device, self.dtype = first.device, first.dtype

    @property
    def blocks(self) -> dict[str, Curvature]:
        return dict(self._blocks)

    @property
    def layer_structure(self) -> dict[str, str]:
        """Layer name -> ``"kronecker"`` (Kronecker-factored block) or ``"exact"``."""
        return {name: b.structure for name, b in self._blocks.items()}

    def _pieces(self, v: Tensor) -> list[Tensor]:
        return list(v.split([b.num_params for b in self._blocks.values()]))

    def _mv(self, v: Tensor) -> Tensor:
        return torch.cat([b._mv(x) for b, x in zip(self._blocks.values(), self._pieces(v))])

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        parts = zip(self._blocks.values(), self._pieces(v))
        return torch.cat([b._solve(x, damping) for b, x in parts])

    def _dense(self) -> Tensor:
        return torch.block_diag(*[b._dense() for b in self._blocks.values()])

    def eigvalsh(self) -> Tensor:
        return torch.cat([b.eigvalsh() for b in self._blocks.values()]).sort().values

    def trace(self) -> Tensor:
        return torch.stack([b.trace() for b in self._blocks.values()]).sum()

    def frobenius_norm(self) -> Tensor:
        norms = torch.stack([b.frobenius_norm() for b in self._blocks.values()])
        return norms.square().sum().sqrt()


def kron_to_flat(block: Tensor, perm: Tensor) -> Tensor:
    """Reorder a dense block given in row-major ``[W | b]`` order into flat-layout order.

    ``perm`` is :meth:`curvlab.layers.LayerKind.flat_index`: ``flat[perm] = grid``.
    """
    out = torch.empty_like(block)
    p = perm.to(block.device)
    out[p.unsqueeze(1), p.unsqueeze(0)] = block
    return out

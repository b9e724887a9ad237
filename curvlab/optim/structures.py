"""Structured square matrices for SINGD's factors (Lin et al. 2024): storage, products, Π̂.

A :class:`Structure` is a sparsity pattern of ``d x d`` matrices that contains the
identity and is closed under multiplication, so ``K(I − β m)`` stays structured when
``K`` and ``m`` are.  A :class:`StructuredMatrix` stores only the pattern's free
entries (``parts``) and multiplies without forming the dense matrix:

* :class:`Dense`: everything (``d²`` entries);
* :class:`Diagonal`: ``d`` entries;
* :class:`BlockDiagonal` (``block_size = b``): ``⌊d/b⌋`` dense ``b x b`` blocks and one
  dense tail block of size ``d mod b`` (a single dense block when ``b ≥ d``);
* :class:`Hierarchical` (``k1``, ``k2``): index sets ``I1`` (first ``k1``), ``I3`` (last
  ``k2``) and ``I2`` (the ``m = d − k1 − k2`` in between), with the pattern

  ::

      [ A  B2  B3 ]    A: k1 x k1, B = [B2 B3]: k1 x (m + k2), dense
      [ 0  D   0  ]    D: diagonal (m)
      [ 0  E   F  ]    E: k2 x m, F: k2 x k2, dense

  i.e. two dense corner blocks coupled through a diagonal middle; ``k1``, ``k2`` are
  clipped to ``d``.  ``O((k1 + k2) d)`` entries.

Projection ``Π̂`` (:meth:`Structure.project`) maps a symmetric ``X`` onto the pattern so
that ``m = ½ Π̂(X)`` is the structured natural-gradient step: ``m + mᵀ = X`` on
``pattern ∪ patternᵀ``.  Entry ``(i, j)`` of the pattern gets ``X_ij`` when ``(j, i)``
is also in the pattern and ``2 X_ij`` otherwise (the off-pattern transpose's share);
for transpose-closed patterns (dense, diagonal, block-diagonal) ``Π̂`` is the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from curvlab.errors import OptionError, ShapeError

Parts = tuple[Tensor, ...]
Device = torch.device | str


class Structure(ABC):
    """A multiplicatively closed sparsity pattern (no data; see :class:`StructuredMatrix`)."""

    name: ClassVar[str]

    def identity(self, dim: int, dtype: torch.dtype, device: Device) -> StructuredMatrix:
        """``I`` of size ``dim``."""
        eye = torch.eye(dim, dtype=dtype, device=device)
        return self.project(eye)

    def zeros(self, dim: int, dtype: torch.dtype, device: Device) -> StructuredMatrix:
        """The zero matrix of size ``dim``."""
        return self.identity(dim, dtype, device) * 0.0

    def project(self, x: Tensor) -> StructuredMatrix:
        """``Π̂(X)`` for a symmetric ``X (d, d)`` (module docstring)."""
        if x.dim() != 2 or x.shape[0] != x.shape[1]:
            raise ShapeError(f"project needs a square matrix, got shape {tuple(x.shape)}.")
        return StructuredMatrix(self, x.shape[0], self._project(x))

    def pattern(self, dim: int) -> Tensor:
        """Boolean ``(dim, dim)`` mask of the free entries."""
        ones = self.identity(dim, torch.float64, "cpu")
        filled = StructuredMatrix(self, dim, tuple(torch.ones_like(p) for p in ones.parts))
        return filled.to_dense() != 0

    @abstractmethod
    def _project(self, x: Tensor) -> Parts: ...

    @abstractmethod
    def _dense(self, parts: Parts, dim: int) -> Tensor: ...

    @abstractmethod
    def _mm(self, parts: Parts, m: Tensor) -> Tensor:
        """``K M`` for dense ``M (d, n)``."""

    @abstractmethod
    def _tmm(self, parts: Parts, m: Tensor) -> Tensor:
        """``Kᵀ M`` for dense ``M (d, n)``."""

    @abstractmethod
    def _rmm(self, parts: Parts, m: Tensor) -> Tensor:
        """``M K`` for dense ``M (n, d)``."""

    @abstractmethod
    def _compose(self, p: Parts, q: Parts) -> Parts:
        """Parts of ``P Q`` (closure under multiplication)."""

    @abstractmethod
    def _trace(self, parts: Parts) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class StructuredMatrix:
    """A ``dim x dim`` matrix of a :class:`Structure`, stored as its free entries.

    Linear combinations act on ``parts`` entry-wise; ``parts`` never repeat an entry, so
    ``‖K‖_F² = Σ parts²``.
    """

    structure: Structure
    dim: int
    parts: Parts

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def to_dense(self) -> Tensor:
        """The ``(dim, dim)`` matrix (for :class:`Dense`, the stored tensor itself)."""
        return self.structure._dense(self.parts, self.dim)

    def mm(self, m: Tensor) -> Tensor:
        """``K M`` for dense ``M (dim, n)``."""
        return self.structure._mm(self.parts, m)

    def tmm(self, m: Tensor) -> Tensor:
        """``Kᵀ M`` for dense ``M (dim, n)``."""
        return self.structure._tmm(self.parts, m)

    def rmm(self, m: Tensor) -> Tensor:
        """``M K`` for dense ``M (n, dim)``."""
        return self.structure._rmm(self.parts, m)

    def trace(self) -> Tensor:
        return self.structure._trace(self.parts)

    def squared_norm(self) -> Tensor:
        """``‖K‖_F² = tr(KᵀK)``."""
        return sum(p.square().sum() for p in self.parts)

    def __matmul__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check(other)
        return StructuredMatrix(
            self.structure, self.dim, self.structure._compose(self.parts, other.parts)
        )

    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check(other)
        return StructuredMatrix(
            self.structure, self.dim, tuple(p + q for p, q in zip(self.parts, other.parts))
        )

    def __sub__(self, other: StructuredMatrix) -> StructuredMatrix:
        return self + other * -1.0

    def __mul__(self, scalar: float | Tensor) -> StructuredMatrix:
        return StructuredMatrix(self.structure, self.dim, tuple(p * scalar for p in self.parts))

    __rmul__ = __mul__

    def _check(self, other: StructuredMatrix) -> None:
        if other.structure != self.structure or other.dim != self.dim:
            raise OptionError(
                f"cannot combine a {self.dim}-dim {self.structure} with a "
                f"{other.dim}-dim {other.structure}."
            )


@dataclass(frozen=True)
class Dense(Structure):
    """All ``d²`` entries."""

    name: ClassVar[str] = "dense"

    def _project(self, x: Tensor) -> Parts:
        return (x.clone(),)

    def _dense(self, parts: Parts, dim: int) -> Tensor:
        return parts[0]

    def _mm(self, parts: Parts, m: Tensor) -> Tensor:
        return parts[0] @ m

    def _tmm(self, parts: Parts, m: Tensor) -> Tensor:
        return parts[0].T @ m

    def _rmm(self, parts: Parts, m: Tensor) -> Tensor:
        return m @ parts[0]

    def _compose(self, p: Parts, q: Parts) -> Parts:
        return (p[0] @ q[0],)

    def _trace(self, parts: Parts) -> Tensor:
        return parts[0].diagonal().sum()


@dataclass(frozen=True)
class Diagonal(Structure):
    """The diagonal, ``d`` entries."""

    name: ClassVar[str] = "diagonal"

    def _project(self, x: Tensor) -> Parts:
        return (x.diagonal().clone(),)

    def _dense(self, parts: Parts, dim: int) -> Tensor:
        return torch.diag(parts[0])

    def _mm(self, parts: Parts, m: Tensor) -> Tensor:
        return parts[0].unsqueeze(1) * m

    _tmm = _mm

    def _rmm(self, parts: Parts, m: Tensor) -> Tensor:
        return m * parts[0]

    def _compose(self, p: Parts, q: Parts) -> Parts:
        return (p[0] * q[0],)

    def _trace(self, parts: Parts) -> Tensor:
        return parts[0].sum()


@dataclass(frozen=True)
class BlockDiagonal(Structure):
    """Dense ``b x b`` diagonal blocks plus a dense tail block of size ``d mod b``.

    Parts: ``blocks (⌊d/b⌋, b, b)`` and ``tail (d mod b, d mod b)``.
    """

    block_size: int = 16
    name: ClassVar[str] = "block_diagonal"

    def __post_init__(self) -> None:
        if int(self.block_size) != self.block_size or self.block_size < 1:
            raise OptionError(f"block_size must be an integer ≥ 1, got {self.block_size!r}.")

    def _split(self, dim: int) -> tuple[int, int]:
        """``(number of full blocks, rows they cover)``."""
        n = dim // self.block_size
        return n, n * self.block_size

    def _project(self, x: Tensor) -> Parts:
        n, head = self._split(x.shape[0])
        b = self.block_size
        grid = x[:head, :head].reshape(n, b, n, b)
        blocks = torch.diagonal(grid, dim1=0, dim2=2).permute(2, 0, 1).clone()
        return blocks, x[head:, head:].clone()

    def _dense(self, parts: Parts, dim: int) -> Tensor:
        blocks, tail = parts
        return torch.block_diag(*blocks.unbind(0), tail)

    def _mm(self, parts: Parts, m: Tensor) -> Tensor:
        blocks, tail = parts
        n, head = blocks.shape[0], blocks.shape[0] * self.block_size
        cols = m.shape[1]
        top = torch.bmm(blocks, m[:head].reshape(n, self.block_size, cols)).reshape(head, cols)
        return torch.cat([top, tail @ m[head:]])

    def _tmm(self, parts: Parts, m: Tensor) -> Tensor:
        blocks, tail = parts
        return self._mm((blocks.transpose(1, 2), tail.T), m)

    def _rmm(self, parts: Parts, m: Tensor) -> Tensor:
        blocks, tail = parts
        n, head = blocks.shape[0], blocks.shape[0] * self.block_size
        left = m[:, :head].reshape(m.shape[0], n, self.block_size)
        top = torch.einsum("knb,nbc->knc", left, blocks).reshape(m.shape[0], head)
        return torch.cat([top, m[:, head:] @ tail], dim=1)

    def _compose(self, p: Parts, q: Parts) -> Parts:
        return torch.bmm(p[0], q[0]), p[1] @ q[1]

    def _trace(self, parts: Parts) -> Tensor:
        blocks, tail = parts
        return blocks.diagonal(dim1=1, dim2=2).sum() + tail.diagonal().sum()


@dataclass(frozen=True)
class Hierarchical(Structure):
    """Two dense corner blocks (``k1``, ``k2``) coupled through a diagonal middle.

    Parts: ``A (k1, k1)``, ``B (k1, m + k2)``, ``D (m,)``, ``E (k2, m)``, ``F (k2, k2)``
    (module docstring), with ``k1, k2`` clipped to the dimension.
    """

    k1: int = 15
    k2: int = 15
    name: ClassVar[str] = "hierarchical"

    def __post_init__(self) -> None:
        for k in (self.k1, self.k2):
            if int(k) != k or k < 0:
                raise OptionError(f"k1 and k2 must be integers ≥ 0, got {self.k1!r}, {self.k2!r}.")

    def sizes(self, dim: int) -> tuple[int, int, int]:
        """``(k1, m, k2)`` for dimension ``dim``."""
        k1 = min(self.k1, dim)
        k2 = min(self.k2, dim - k1)
        return k1, dim - k1 - k2, k2

    def _project(self, x: Tensor) -> Parts:
        k1, m, _ = self.sizes(x.shape[0])
        j = k1 + m
        return (
            x[:k1, :k1].clone(),
            2 * x[:k1, k1:],
            x[k1:j, k1:j].diagonal().clone(),
            2 * x[j:, k1:j],
            x[j:, j:].clone(),
        )

    def _dense(self, parts: Parts, dim: int) -> Tensor:
        a, b, d, e, f = parts
        k1, m = a.shape[0], d.shape[0]
        j = k1 + m
        out = a.new_zeros(dim, dim)
        out[:k1, :k1] = a
        out[:k1, k1:] = b
        out[k1:j, k1:j] = torch.diag(d)
        out[j:, k1:j] = e
        out[j:, j:] = f
        return out

    def _mm(self, parts: Parts, x: Tensor) -> Tensor:
        a, b, d, e, f = parts
        k1, m = a.shape[0], d.shape[0]
        x1, x2, x3 = x[:k1], x[k1 : k1 + m], x[k1 + m :]
        return torch.cat([a @ x1 + b @ x[k1:], d.unsqueeze(1) * x2, e @ x2 + f @ x3])

    def _tmm(self, parts: Parts, x: Tensor) -> Tensor:
        a, b, d, e, f = parts
        k1, m = a.shape[0], d.shape[0]
        x1, x2, x3 = x[:k1], x[k1 : k1 + m], x[k1 + m :]
        bt = b.T @ x1  # (m + k2, n)
        return torch.cat([a.T @ x1, bt[:m] + d.unsqueeze(1) * x2 + e.T @ x3, bt[m:] + f.T @ x3])

    def _rmm(self, parts: Parts, x: Tensor) -> Tensor:
        a, b, d, e, f = parts
        k1, m = a.shape[0], d.shape[0]
        x1, x2, x3 = x[:, :k1], x[:, k1 : k1 + m], x[:, k1 + m :]
        rest = torch.cat([x2 * d + x3 @ e, x3 @ f], dim=1)
        return torch.cat([x1 @ a, x1 @ b + rest], dim=1)

    def _compose(self, p: Parts, q: Parts) -> Parts:
        a, b, d, e, f = p
        qa, qb, qd, qe, qf = q
        m = d.shape[0]
        b2, b3 = b[:, :m], b[:, m:]
        b_new = a @ qb + torch.cat([b2 * qd + b3 @ qe, b3 @ qf], dim=1)
        return a @ qa, b_new, d * qd, e * qd + f @ qe, f @ qf

    def _trace(self, parts: Parts) -> Tensor:
        a, _, d, _, f = parts
        return a.diagonal().sum() + d.sum() + f.diagonal().sum()


NAMED: dict[str, Structure] = {
    "dense": Dense(),
    "diagonal": Diagonal(),
    "block_diagonal": BlockDiagonal(),
    "hierarchical": Hierarchical(),
}


def as_structure(spec: str | Structure) -> Structure:
    """A :class:`Structure` from itself or a name in :data:`NAMED` (default options)."""
    if isinstance(spec, Structure):
        return spec
    if spec not in NAMED:
        raise OptionError(
            f"structure {spec!r} is unknown; choose one of {', '.join(NAMED)} or pass a "
            "Structure (e.g. BlockDiagonal(block_size=8), Hierarchical(k1=8, k2=4))."
        )
    return NAMED[spec]

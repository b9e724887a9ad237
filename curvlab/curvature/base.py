"""The one interface every curvature object shares, and its layer-wise composition.

A :class:`Curvature` is a symmetric positive semi-definite ``P x P`` matrix ``C``
over flat vectors (DESIGN.md layout).  Members: ``mv``, ``solve``, ``to_dense``,
``eigvalsh``, ``trace``, ``frobenius_norm``, ``blocks`` and ``as_linear_operator``.
Results come back in the compute dtype (the model's, float32 for half/bfloat16).

Comparisons (:mod:`curvlab.compare`) use only this interface.  Beyond the members
above it offers, with defaults that any subclass may replace by a closed form:

* ``squared_frobenius_norm()``: ``‖C‖_F²`` in float64;
* ``fisher_inner(layers, scale)``: ``⟨C, F⟩ = s Σ_nc u_ncᵀ C u_nc`` for the exact
  Fisher ``F = s U Uᵀ`` of the captured ``layers`` that ``C`` covers;
* ``eigenbasis_statistics(layer, scale)``: for a block that is diagonal in a
  Kronecker eigenbasis ``Q``, its eigenvalues ``D`` and the exact block's diagonal
  ``S = diag(Qᵀ F Q)`` there (``None`` otherwise);
* ``nonzero_eigenvalues()`` and ``eigen_projections(x, k)``: the numerically non-zero
  spectrum and the top-``k`` eigenvectors projected onto ``x``;
* ``column_products(layers)``: ``Uᵀ C U`` for the per-column gradients ``U`` of the
  captured ``layers`` (``N C' x N C'``), and ``logdet_ratio(λ)``: ``log det(I + C/λ)``
  (both for the KL divergence of :mod:`curvlab.compare.divergence`);
* ``damping_excess(λ)``: ``‖M(λ) − (C + λI)‖_F`` for the matrix ``M(λ)`` that
  ``solve`` inverts (``None`` when it inverts ``C + λI`` itself or has no closed form);
* ``kronecker_factored``: every layer block is one Kronecker product ``A ⊗ G``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from curvlab.capture import LayerCapture
from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError, ShapeError
from curvlab.numerics import SOLVE_DTYPE, check_damping, check_vector


def numerically_nonzero(values: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """``values`` above the rank tolerance ``size · eps(dtype) · max(values)`` (as
    ``numpy.linalg.matrix_rank``; ``size`` = the eigenproblem's size)."""
    if values.numel() == 0:
        return values
    top = values.max()
    if top <= 0:
        return values[:0]
    return values[values > size * torch.finfo(dtype).eps * top]


def top_count(values: Tensor, k: int, rtol: float) -> int:
    """How many of the descending ``values`` are ``≥`` the ``k``-th largest, counting
    values within ``rtol · values[0]`` of it as tied."""
    if values.numel() == 0:
        return 0
    kth = values[min(k, values.numel()) - 1]
    return int((values >= kth - rtol * values[0]).sum())


TIE_RTOL = 1e-9
"""Eigenvalues within this fraction of the largest one count as tied."""


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
    kronecker_factored: bool = False
    """Whether every layer block is one Kronecker product ``A ⊗ G`` of two factors (layers
    without Kronecker factors, ``structure == "exact"``, aside)."""

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

    def squared_frobenius_norm(self) -> float:
        """``‖C‖_F²`` in float64 (default: from :meth:`frobenius_norm`)."""
        return float(self.frobenius_norm().to(SOLVE_DTYPE)) ** 2

    def fisher_inner(self, layers: Sequence[LayerCapture], scale: float) -> float:
        """``⟨C, F⟩ = tr(C F) = s Σ_nc u_ncᵀ C u_nc`` for the exact Fisher ``F = s U Uᵀ``
        of ``layers`` (the captured layers this matrix covers, in flat-layout order).

        The default applies ``C`` to every per-column gradient ``u_nc``, chunked over
        samples; subclasses replace it by closed forms.
        """
        from curvlab.curvature.columns import flat_column_gradients, samples_per_chunk

        size = sum(lc.info.num_params for lc in layers)
        if size != self.num_params:
            raise ShapeError(f"the layers hold {size} parameters, the curvature {self.num_params}")
        n = layers[0].a.shape[0]
        step = samples_per_chunk(layers)
        total = 0.0
        for i in range(0, n, step):
            rows = flat_column_gradients(layers, i, min(i + step, n), self.dtype)
            for row in rows:
                total += float(row.to(SOLVE_DTYPE) @ self.mv(row).to(SOLVE_DTYPE))
        return scale * total

    def column_products(self, layers: Sequence[LayerCapture]) -> Tensor:
        """``Uᵀ C U`` ``(N C', N C')`` float64, rows ``(n, c)``, for the per-column
        gradients ``U`` of ``layers`` (the captured layers this matrix covers).

        The default applies ``C`` to every column (chunked over samples); subclasses
        replace it by closed forms.
        """
        from curvlab.curvature.columns import flat_column_gradients, samples_per_chunk

        n = layers[0].a.shape[0]
        step = samples_per_chunk(layers)
        spans = [(i, min(i + step, n)) for i in range(0, n, step)]
        cu = []
        for i, j in spans:
            rows = flat_column_gradients(layers, i, j, self.dtype)
            cu.append(torch.stack([self.mv(r).to(SOLVE_DTYPE) for r in rows], dim=1))
        cu_all = torch.cat(cu, dim=1)  # C U, (P, N C')
        out = []
        for i, j in spans:
            rows = flat_column_gradients(layers, i, j, self.dtype).to(SOLVE_DTYPE)
            out.append(rows @ cu_all)
        return torch.cat(out)

    def logdet_ratio(self, damping: float) -> float:
        """``log det(I + C/λ) = log det(C + λI) − P log λ`` (float64).  Default: from
        :meth:`eigvalsh`."""
        values = self.eigvalsh().to(SOLVE_DTYPE).clamp_min(0.0)
        return float(torch.log1p(values / damping).sum())

    def eigenbasis_statistics(
        self, layer: LayerCapture, scale: float
    ) -> tuple[Tensor, Tensor] | None:
        """For one layer's block diagonal in a Kronecker eigenbasis
        ``Q = Q_out ⊗ Q_in``: its eigenvalues ``D`` and the exact block's diagonal in that
        basis, ``S = s Σ_nc (Q_outᵀ Γ_nc Q_in)²``, both ``(d_out, d_in_h)`` float64.
        ``None`` (the default) when the block has no such eigenbasis."""
        return None

    def nonzero_eigenvalues(self) -> Tensor:
        """The numerically non-zero eigenvalues (unsorted, float64); each eigenproblem
        uses its own rank tolerance (:func:`numerically_nonzero`)."""
        return numerically_nonzero(self.eigvalsh().to(SOLVE_DTYPE), self.num_params, self.dtype)

    def eigen_projections(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The top-``k`` numerically non-zero eigenvalues ``(m,)`` (descending, plus any
        tied with the ``k``-th) and ``xᵀ w_j`` ``(k_x, m)`` for their unit eigenvectors
        ``w_j`` and ``x`` ``(P, k_x)``, float64.  Default: a dense eigendecomposition
        (refused above the memory budget, as :meth:`to_dense`)."""
        values, vectors = torch.linalg.eigh(self.to_dense().to(SOLVE_DTYPE))
        values, vectors = values.flip(0), vectors.flip(1)
        keep = numerically_nonzero(values, self.num_params, self.dtype).numel()
        m = top_count(values[:keep], k, TIE_RTOL)
        return values[:m], x.to(SOLVE_DTYPE).T @ vectors[:, :m]

    def damping_excess(self, damping: float) -> Tensor | None:
        """``‖M(λ) − (C + λI)‖_F`` for the matrix ``M(λ)`` that :meth:`solve` inverts,
        or ``None`` (the default) when ``solve`` inverts ``C + λI`` itself or the
        excess has no closed form."""
        return None

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
        self.kronecker_factored = any(b.kronecker_factored for b in blocks.values()) and all(
            b.kronecker_factored or b.structure == "exact" for b in blocks.values()
        )

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

    def squared_frobenius_norm(self) -> float:
        return sum(b.squared_frobenius_norm() for b in self._blocks.values())

    def fisher_inner(self, layers: Sequence[LayerCapture], scale: float) -> float:
        """``⟨C, F⟩ = Σ_l ⟨C_l, F_ll⟩``: only the diagonal blocks of ``F`` meet ``C``'s."""
        by_name = {lc.name: lc for lc in layers}
        if set(by_name) != set(self._blocks):
            raise ShapeError(
                f"the layers ({', '.join(by_name)}) are not this curvature's blocks "
                f"({', '.join(self._blocks)})"
            )
        return sum(b.fisher_inner([by_name[n]], scale) for n, b in self._blocks.items())

    def nonzero_eigenvalues(self) -> Tensor:
        return torch.cat([b.nonzero_eigenvalues() for b in self._blocks.values()])

    def column_products(self, layers: Sequence[LayerCapture]) -> Tensor:
        """``Σ_l U_lᵀ C_l U_l``: the blocks' products summed."""
        by_name = {lc.name: lc for lc in layers}
        return sum(b.column_products([by_name[n]]) for n, b in self._blocks.items())

    def logdet_ratio(self, damping: float) -> float:
        return sum(b.logdet_ratio(damping) for b in self._blocks.values())

    def eigen_projections(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Each block's top-``k`` projections (on its rows of ``x``), merged."""
        values, proj, offset = [], [], 0
        for block in self._blocks.values():
            v, p = block.eigen_projections(x[offset : offset + block.num_params], k)
            values.append(v)
            proj.append(p)
            offset += block.num_params
        all_values, order = torch.cat(values).sort(descending=True)
        m = top_count(all_values, k, TIE_RTOL)
        return all_values[:m], torch.cat(proj, dim=1)[:, order[:m]]

    def damping_excess(self, damping: float) -> Tensor | None:
        """The blocks' excesses combined (``None`` when no block has one)."""
        norms = [b.damping_excess(damping) for b in self._blocks.values()]
        if all(n is None for n in norms):
            return None
        return torch.stack([n for n in norms if n is not None]).square().sum().sqrt()


def kron_to_flat(block: Tensor, perm: Tensor) -> Tensor:
    """Reorder a dense block given in row-major ``[W | b]`` order into flat-layout order.

    ``perm`` is :meth:`curvlab.layers.LayerKind.flat_index`: ``flat[perm] = grid``.
    """
    out = torch.empty_like(block)
    p = perm.to(block.device)
    out[p.unsqueeze(1), p.unsqueeze(0)] = block
    return out

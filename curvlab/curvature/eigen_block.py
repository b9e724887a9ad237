"""A layer block diagonal in a Kronecker eigenbasis: the kernel of KFAC, FOOF and EKFAC.

In the row-major ``[W | b]`` layout of a layer (``V`` of shape ``d_out x d_in_h``) the block is

    C = (Q_out ⊗ Q_in) diag(vec D) (Q_out ⊗ Q_in)ᵀ,   i.e.  C V = Q_out (D ∘ (Q_outᵀ V Q_in)) Q_inᵀ,

with orthogonal ``Q_out (d_out x d_out)``, ``Q_in (d_in_h x d_in_h)`` and eigenvalues
``D (d_out x d_in_h)``.  KFAC: ``D = s_G s_Aᵀ``; FOOF: ``Q_out = I``, ``D = 1 s_Aᵀ``;
EKFAC: ``D`` = the Fisher's diagonal in the KFAC eigenbasis; diagonal methods:
``Q_out = Q_in = I``.  All in float64.

Against the layer's exact block ``F = s Σ_nc vec(Γ_nc) vec(Γ_nc)ᵀ``:
``⟨C, F⟩ = Σ D ∘ S`` with ``S = s Σ_nc (Q_outᵀ Γ_nc Q_in)²`` (the exact block's diagonal
in this basis), ``‖C‖_F² = Σ D²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.capture import LayerCapture
from curvlab.config import options
from curvlab.curvature.base import (
    TIE_RTOL,
    Curvature,
    kron_to_flat,
    numerically_nonzero,
    top_count,
)
from curvlab.curvature.columns import eigenbasis_second_moment
from curvlab.curvature.gram import layer_gram, per_sample_gradients
from curvlab.layers import LayerKind
from curvlab.numerics import SOLVE_DTYPE, require_positive


def _outer_factors(d: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(u, v)`` with ``d = u vᵀ`` and ``u, v ≥ 0`` read off the largest entry's row and
    column, or ``None`` when ``d`` has a negative entry or is zero."""
    if (d < 0).any():
        return None
    flat = int(d.argmax())
    i, j = divmod(flat, d.shape[1])
    top = d[i, j]
    if top <= 0:
        return None
    return d[:, j].clone(), d[i, :] / top


class EigenBlock(Curvature):
    """One layer's block ``(Q_out ⊗ Q_in) diag(D) (Q_out ⊗ Q_in)ᵀ``.

    Args:
        info: The layer (for the flat <-> ``[W | b]`` layout).
        q_out: ``(d_out, d_out)`` orthogonal, or ``None`` for the identity.
        q_in: ``(d_in_h, d_in_h)`` orthogonal, or ``None`` for the identity.
        eigenvalues: ``D`` of shape ``(d_out, d_in_h)``.
        dtype: Dtype of results.
        kronecker_factored: ``D`` is an outer product (the block is ``A ⊗ G``).
    """

    @property
    def structure(self) -> str:
        """``"kronecker"``, or ``"exact"`` for a layer kind without Kronecker factors
        (its "gradient factor" is then the exact block and its input factor is 1)."""
        return "kronecker" if self.info.kronecker else "exact"

    def __init__(
        self,
        info: LayerKind,
        q_out: Tensor | None,
        q_in: Tensor | None,
        eigenvalues: Tensor,
        dtype: torch.dtype,
        kronecker_factored: bool = False,
    ):
        self.info = info
        self.q_out, self.q_in, self.d = q_out, q_in, eigenvalues.to(SOLVE_DTYPE)
        self.num_params = info.num_params
        self.device, self.dtype = eigenvalues.device, dtype
        self.kronecker_factored = kronecker_factored
        self._statistics: tuple[Tensor, float, Tensor] | None = None

    @property
    def blocks(self) -> dict[str, Curvature]:
        return {self.info.name: self}

    def _rotate(self, mat: Tensor) -> Tensor:
        out = mat if self.q_in is None else mat @ self.q_in
        return out if self.q_out is None else self.q_out.T @ out

    def _unrotate(self, mat: Tensor) -> Tensor:
        out = mat if self.q_in is None else mat @ self.q_in.T
        return out if self.q_out is None else self.q_out @ out

    def _apply(self, v: Tensor, scaling: Tensor, multiply: bool) -> Tensor:
        rot = self._rotate(self.info.to_matrix(v.to(SOLVE_DTYPE)))
        rot = rot * scaling if multiply else rot / scaling
        return self.info.to_flat(self._unrotate(rot)).to(self.dtype)

    def _mv(self, v: Tensor) -> Tensor:
        return self._apply(v, self.d, multiply=True)

    def denominator(self, damping: float) -> Tensor:
        """Eigenvalues of the damped matrix that :meth:`solve` inverts: ``D + λ``."""
        return self.d + damping

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        denom = self.denominator(damping)
        if damping == 0:
            require_positive(denom.reshape(-1), f"the curvature block of layer '{self.info.name}'")
        return self._apply(v, denom, multiply=False)

    def _dense(self) -> Tensor:
        eye = torch.eye(self.info.d_out, dtype=SOLVE_DTYPE, device=self.device)
        q_out = eye if self.q_out is None else self.q_out
        q_in = self.q_in
        if q_in is None:
            q_in = torch.eye(self.info.d_in_h, dtype=SOLVE_DTYPE, device=self.device)
        q = torch.kron(q_out.contiguous(), q_in.contiguous())
        grid = (q * self.d.reshape(-1)) @ q.T
        return kron_to_flat(grid, self.info.flat_index()).to(self.dtype)

    def eigvalsh(self) -> Tensor:
        return self.d.reshape(-1).sort().values.to(self.dtype)

    def trace(self) -> Tensor:
        return self.d.sum().to(self.dtype)

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.d).to(self.dtype)

    def squared_frobenius_norm(self) -> float:
        return float(self.d.square().sum())

    def eigenbasis_statistics(self, layer: LayerCapture, scale: float) -> tuple[Tensor, Tensor]:
        """``(D, S)``; ``S`` is kept for the last layer capture asked about."""
        kept = self._statistics
        if kept is None or kept[0] is not layer.e or kept[1] != scale:
            s = eigenbasis_second_moment(layer, self.q_out, self.q_in, scale)
            self._statistics = kept = (layer.e, scale, s)
        return self.d, kept[2]

    def fisher_inner(self, layers: Sequence[LayerCapture], scale: float) -> float:
        """``Σ D ∘ S`` (module docstring)."""
        (layer,) = layers
        d, s = self.eigenbasis_statistics(layer, scale)
        return float((d * s).sum())

    def logdet_ratio(self, damping: float) -> float:
        """``Σ log(1 + D / λ)``."""
        return float(torch.log1p(self.d.clamp_min(0.0) / damping).sum())

    def column_products(self, layers: Sequence[LayerCapture]) -> Tensor:
        """``Uᵀ C U`` with ``(Uᵀ C U)[(n,c),(m,d)] = Σ D ∘ Γ̃_nc ∘ Γ̃_md`` for the rotated
        column gradients ``Γ̃ = Q_outᵀ Γ Q_in``.  When ``D = u vᵀ ≥ 0`` (a Kronecker
        block) this is the Gram of the transformed inputs ``ā Q_in diag(√v)`` and
        columns ``e Q_out diag(√u)`` (:func:`~curvlab.curvature.gram.layer_gram`), without
        per-sample gradients; otherwise the rotated gradients are paired in chunks."""
        (layer,) = layers
        a, e = layer.a.to(SOLVE_DTYPE), layer.e.to(SOLVE_DTYPE)
        a = a if self.q_in is None else a @ self.q_in
        e = e if self.q_out is None else e @ self.q_out
        factors = _outer_factors(self.d) if self.kronecker_factored else None
        if factors is not None:
            u, v = factors
            return layer_gram(a * v.sqrt(), e * u.sqrt())
        c, n = e.shape[:2]
        step = max(1, options.chunk_bytes // max(1, 8 * c * self.num_params))
        spans = [(i, min(i + step, n)) for i in range(0, n, step)]

        def rotated(i: int, j: int) -> Tensor:
            g = per_sample_gradients(a[i:j], e[:, i:j].permute(1, 0, 2, 3))
            return g.reshape((j - i) * c, -1)

        out = torch.empty(n * c, n * c, dtype=SOLVE_DTYPE, device=a.device)
        weights = self.d.reshape(-1)
        for i, j in spans:
            left = rotated(i, j) * weights
            for k, m in spans:
                out[i * c : j * c, k * c : m * c] = left @ rotated(k, m).T
        return out

    def nonzero_eigenvalues(self) -> Tensor:
        """``D`` above the rank tolerance of the larger Kronecker factor's eigenproblem."""
        return numerically_nonzero(self.d.reshape(-1), max(self.d.shape), self.dtype)

    def eigen_projections(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Projections onto the eigenvectors ``q_out,i ⊗ q_in,j`` without forming them:
        ``x ↦ Q_outᵀ X Q_in``."""
        rot = self._rotate(self.info.to_matrix(x.T.to(SOLVE_DTYPE)))  # (k_x, d_out, d_in_h)
        values, order = self.d.reshape(-1).sort(descending=True)
        keep = numerically_nonzero(values, max(self.d.shape), self.dtype).numel()
        m = top_count(values[:keep], k, TIE_RTOL)
        return values[:m], rot.reshape(x.shape[1], self.d.numel())[:, order[:m]]

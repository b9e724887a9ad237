"""A layer block diagonal in a Kronecker eigenbasis: the kernel of KFAC, FOOF and EKFAC.

In the row-major ``[W | b]`` layout of a layer (``V`` of shape ``d_out x d_in_h``) the block is

    C = (Q_out ⊗ Q_in) diag(vec D) (Q_out ⊗ Q_in)ᵀ,   i.e.  C V = Q_out (D ∘ (Q_outᵀ V Q_in)) Q_inᵀ,

with orthogonal ``Q_out (d_out x d_out)``, ``Q_in (d_in_h x d_in_h)`` and eigenvalues
``D (d_out x d_in_h)``.  KFAC: ``D = s_G s_Aᵀ``; FOOF: ``Q_out = I``, ``D = 1 s_Aᵀ``;
EKFAC: ``D`` = the Fisher's diagonal in the KFAC eigenbasis.  All in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.curvature.base import Curvature, kron_to_flat
from curvlab.layers import LayerKind
from curvlab.numerics import SOLVE_DTYPE, require_positive


class EigenBlock(Curvature):
    """One layer's block ``(Q_out ⊗ Q_in) diag(D) (Q_out ⊗ Q_in)ᵀ``.

    Args:
        info: The layer (for the flat <-> ``[W | b]`` layout).
        q_out: ``(d_out, d_out)`` orthogonal, or ``None`` for the identity.
        q_in: ``(d_in_h, d_in_h)`` orthogonal.
        eigenvalues: ``D`` of shape ``(d_out, d_in_h)``.
        dtype: Dtype of results.
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
        q_in: Tensor,
        eigenvalues: Tensor,
        dtype: torch.dtype,
    ):
        self.info = info
        self.q_out, self.q_in, self.d = q_out, q_in, eigenvalues.to(SOLVE_DTYPE)
        self.num_params = info.num_params
        self.device, self.dtype = q_in.device, dtype

    @property
    def blocks(self) -> dict[str, Curvature]:
        return {self.info.name: self}

    def _rotate(self, mat: Tensor) -> Tensor:
        out = mat @ self.q_in
        return out if self.q_out is None else self.q_out.T @ out

    def _unrotate(self, mat: Tensor) -> Tensor:
        out = mat @ self.q_in.T
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
        q_out = self.q_out
        if q_out is None:
            q_out = torch.eye(self.info.d_out, dtype=SOLVE_DTYPE, device=self.device)
        q = torch.kron(q_out.contiguous(), self.q_in.contiguous())
        grid = (q * self.d.reshape(-1)) @ q.T
        return kron_to_flat(grid, self.info.flat_index()).to(self.dtype)

    def eigvalsh(self) -> Tensor:
        return self.d.reshape(-1).sort().values.to(self.dtype)

    def trace(self) -> Tensor:
        return self.d.sum().to(self.dtype)

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.d).to(self.dtype)

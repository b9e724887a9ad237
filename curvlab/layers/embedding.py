"""``nn.Embedding`` as a matrix layer acting on one-hot inputs.

The embedding of token ``x`` is ``W[x] = Wᵀ onehot(x)``, so the matrix layer is
``W̄ = Wᵀ`` (``d_out = embedding_dim`` rows, ``d_in = num_embeddings`` columns, no bias)
and the rows ``ā_nt = onehot(x_nt)``.  Then the Gram's input products are index
coincidences, ``ā_nt·ā_mt' = [x_nt = x_mt']``, KFAC's input factor is diagonal (token
counts), and no per-sample ``V x d`` gradient is ever formed.  ``padding_idx``: PyTorch
gives that row no gradient, so its one-hot column is zero (the padding token counts
for nothing in ``ā``).

The flat layout is the weight ``(V, d)`` row-major (DESIGN.md), i.e. ``W̄`` transposed:
:meth:`to_matrix` and :meth:`to_flat` transpose.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvlab.errors import UnsupportedModelError
from curvlab.layers.base import MatrixKind


class EmbeddingKind(MatrixKind):
    """``nn.Embedding`` (weight ``(V, d)``): ``W̄ = Wᵀ`` on one-hot rows ``(N, T, V)``."""

    calls_as_locations = True

    def __init__(self, name: str, module: nn.Module, offset: int):
        super().__init__(name, module, offset)
        options = {"max_norm": module.max_norm is not None, "sparse": module.sparse}
        used = [k for k, v in options.items() if v]
        if used:
            raise UnsupportedModelError(
                f"module '{name}' (Embedding) with {', '.join(used)} is not supported "
                "(max_norm rewrites the weight during the forward pass, sparse gives sparse "
                "gradients); use nn.Embedding without these options."
            )

    @property
    def has_bias(self) -> bool:
        return False

    @property
    def d_in(self) -> int:
        return self.module.num_embeddings

    @property
    def d_out(self) -> int:
        return self.module.embedding_dim

    def to_matrix(self, flat: Tensor) -> Tensor:
        """Flat slice ``(..., V·d)`` (weight row-major) -> ``W̄ = Wᵀ`` ``(..., d, V)``."""
        return flat.reshape(*flat.shape[:-1], self.d_in, self.d_out).transpose(-1, -2)

    def to_flat(self, mat: Tensor) -> Tensor:
        """``W̄`` ``(..., d, V)`` -> flat slice ``(..., V·d)`` (weight row-major)."""
        return mat.transpose(-1, -2).reshape(*mat.shape[:-2], self.d_in * self.d_out)

    def weight_product(self, rows: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        """``Σ_nt rows_nt ā_ntᵀ`` written as the weight's gradient ``(V, d)``, flat."""
        if out is None:
            out = rows.new_empty(self.num_params)
        r = rows.reshape(-1, self.d_out)
        x = a.reshape(-1, self.d_in)
        torch.mm(x.T, r, out=out.view(self.d_in, self.d_out))
        return out

    def unfold(self, x: Tensor) -> Tensor:
        """Token indices ``(N, ...)`` -> one-hot rows ``(N, T, V)`` (padding column 0)."""
        idx = x.reshape(x.shape[0], -1)
        w = self.module.weight
        a = w.new_zeros(*idx.shape, self.d_in)
        a.scatter_(-1, idx.unsqueeze(-1), 1.0)
        if self.module.padding_idx is not None:
            a[..., self.module.padding_idx] = 0.0
        return a

    def sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        """``(B, N, V·d)``: each column's output-gradients scattered into the rows of the
        tokens they belong to (no one-hot rows); the padding row stays zero."""
        idx = x.reshape(x.shape[0], -1).long()  # (N, T)
        rows = self.output_rows(grads)  # (B, N, T, d)
        b, n, t, d = rows.shape
        out_rows = rows.new_zeros(b, n, self.d_in, d)
        out_rows.scatter_add_(2, idx.view(1, n, t, 1).expand(b, n, t, d), rows)
        if self.module.padding_idx is not None:
            out_rows[:, :, self.module.padding_idx] = 0.0
        return out_rows.reshape(b, n, -1)

    def output_rows(self, g: Tensor) -> Tensor:
        return g.reshape(*g.shape[:2], -1, g.shape[-1])

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return tuple(out.shape[1:-1])

"""Per-column layer gradients ``Γ_nc`` from a capture, in chunks of samples.

For a layer with homogeneous inputs ``ā (N, T, d_in_h)`` and output-gradient columns
``e (C', N, T, d_out)`` the gradient of Fisher column ``(n, c)`` with respect to the
layer's ``[W | b]`` is

    Γ_nc = Σ_t e_nct ā_ntᵀ    (d_out x d_in_h),

so the layer's exact Fisher block is ``s Σ_nc vec(Γ_nc) vec(Γ_nc)ᵀ`` (row-major
``vec``).  Chunks are sized by ``curvlab.config.options.chunk_bytes``; rows are ordered
``(n, c)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from curvlab.capture import LayerCapture
from curvlab.config import options
from curvlab.curvature.gram import per_sample_gradients
from curvlab.numerics import SOLVE_DTYPE, compute_dtype


def samples_per_chunk(layers: Sequence[LayerCapture], element_size: int = 8) -> int:
    """How many samples' column gradients of ``layers`` fit in one chunk (at least 1)."""
    c = layers[0].e.shape[0]
    per_sample = c * sum(lc.info.num_params for lc in layers) * element_size
    return max(1, options.chunk_bytes // max(1, per_sample))


def column_gradients(lc: LayerCapture, dtype: torch.dtype | None = None) -> Iterator[Tensor]:
    """``Γ_nc`` of ``lc`` as chunks ``(b C', d_out, d_in_h)`` (rows ``(n, c)``), in
    ``dtype`` (default: the compute dtype of the capture)."""
    dtype = compute_dtype(lc.a.dtype) if dtype is None else dtype
    n = lc.a.shape[0]
    step = samples_per_chunk([lc], torch.empty(0, dtype=dtype).element_size())
    for i in range(0, n, step):
        a = lc.a[i : i + step].to(dtype)
        e = lc.e[:, i : i + step].permute(1, 0, 2, 3).to(dtype)
        yield per_sample_gradients(a, e).flatten(0, 1)


def flat_column_gradients(
    layers: Sequence[LayerCapture], start: int, stop: int, dtype: torch.dtype
) -> Tensor:
    """Rows ``u_nc`` of ``Uᵀ`` over ``layers`` for samples ``start:stop``:
    ``((stop − start) C', P_layers)`` in the flat layout of those layers."""
    parts = []
    for lc in layers:
        a = lc.a[start:stop].to(dtype)
        e = lc.e[:, start:stop].permute(1, 0, 2, 3).to(dtype)
        g = per_sample_gradients(a, e).flatten(0, 1)
        parts.append(lc.info.to_flat(g))
    return torch.cat(parts, dim=1)


def eigenbasis_second_moment(
    lc: LayerCapture, q_g: Tensor | None, q_a: Tensor | None, scale: float
) -> Tensor:
    """``s Σ_{n,c} (Q_Gᵀ Γ_nc Q_A)²`` of shape ``(d_out, d_in_h)``, chunked over samples
    (``None`` for an identity basis: then this is the diagonal of the exact block)."""
    dtype = compute_dtype(lc.a.dtype)
    a = lc.a.to(dtype) if q_a is None else lc.a.to(dtype) @ q_a.to(dtype)  # (N, T, d_in_h)
    e = lc.e.to(dtype) if q_g is None else lc.e.to(dtype) @ q_g.to(dtype)  # (C', N, T, d_out)
    c, n, _, o = e.shape
    per_sample = c * o * a.shape[-1] * a.element_size()
    step = max(1, options.chunk_bytes // per_sample)
    out = torch.zeros(o, a.shape[-1], dtype=SOLVE_DTYPE, device=a.device)
    for i in range(0, n, step):
        g = per_sample_gradients(a[i : i + step], e[:, i : i + step].permute(1, 0, 2, 3))
        out += g.square().sum(dim=(0, 1)).to(SOLVE_DTYPE)
    return scale * out

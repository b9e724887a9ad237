"""Relative Frobenius errors ``‖C − F‖ / ‖F‖`` without forming ``P x P`` matrices.

With ``F = s U Uᵀ`` (``U``: per-column gradients) and a block-diagonal approximation
``C = ⊕_l C_l``:

    ‖C − F‖² = ‖C‖² − 2 tr(C F) + ‖F‖²,    tr(C F) = Σ_l tr(C_l F_ll),
    tr(C_l F_ll) = s Σ_{n,c} u_ncᵀ C_l u_nc,   ‖F‖ = s ‖K‖,   ‖F_ll‖ = s ‖K_l‖,

with ``K`` the full Gram ``UᵀU`` and ``K_l`` the layer's.  Off-diagonal blocks of
``F`` thus count in the whole-network error.  For a layer block diagonal in a
Kronecker eigenbasis, ``C_l = (Q_out ⊗ Q_in) diag(D) (Q_out ⊗ Q_in)ᵀ`` (KFAC, FOOF,
EKFAC), ``tr(C_l F_ll) = Σ D ∘ S`` with ``S = s Σ_nc (Q_outᵀ Γ_nc Q_in)²`` (the
EKFAC statistic, chunked over samples).  Everything is accumulated in float64; the
difference of squares loses about half the digits of the inputs, so errors below
``sqrt(eps)`` of the model's dtype read as noise (≈3e-4 in float32).

Also reported: the Frobenius cosine ``⟨C, F⟩ / (‖C‖ ‖F‖)``, which ignores scale
(FOOF's ``A ⊗ I`` is not meant to match ``F``'s scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from curvlab.capture import LayerCapture
from curvlab.compare.analysis import Analysis
from curvlab.compare.methods import METHODS
from curvlab.config import options
from curvlab.curvature import Curvature, GramFisher, LayerwiseCurvature
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.curvature.ekfac import eigenbasis_second_moment
from curvlab.curvature.gram import per_sample_gradients
from curvlab.numerics import SOLVE_DTYPE, compute_dtype
from curvlab.records import NETWORK, Record


def squared_norm(curv: Curvature) -> float:
    """``‖C‖_F²`` in float64 (from eigenvalues or the Gram when available)."""
    if isinstance(curv, EigenBlock):
        return float(curv.d.square().sum())
    if isinstance(curv, GramFisher):
        return float(curv.scale**2 * curv.gram.square().sum())
    if isinstance(curv, LayerwiseCurvature):
        return sum(squared_norm(b) for b in curv.blocks.values())
    return float(curv.frobenius_norm().to(SOLVE_DTYPE)) ** 2


def _is_exact_block(block: Curvature, lc: LayerCapture) -> bool:
    return isinstance(block, GramFisher) and list(block.blocks) == [lc.name]


def trace_with_fisher(block: Curvature, lc: LayerCapture, scale: float) -> float:
    """``tr(C_l F_ll) = s Σ_nc u_ncᵀ C_l u_nc`` for one layer's block ``C_l``.

    Closed forms for exact blocks (``‖F_ll‖²``) and Kronecker-eigenbasis blocks;
    any other block is applied to the per-column gradients in chunks.
    """
    if _is_exact_block(block, lc):
        return squared_norm(block)
    if isinstance(block, EigenBlock):
        q_out = block.q_out
        if q_out is None:
            q_out = torch.eye(lc.info.d_out, dtype=SOLVE_DTYPE, device=block.q_in.device)
        s = eigenbasis_second_moment(lc, q_out, block.q_in, scale)
        return float((block.d * s).sum())
    dtype = compute_dtype(lc.a.dtype)
    c, n = lc.e.shape[:2]
    step = max(1, options.chunk_bytes // max(1, c * lc.info.num_params * 8))
    total = 0.0
    for i in range(0, n, step):
        g = per_sample_gradients(
            lc.a[i : i + step].to(dtype), lc.e[:, i : i + step].permute(1, 0, 2, 3).to(dtype)
        )
        for row in lc.info.to_flat(g).reshape(-1, lc.info.num_params):
            total += float(row.to(SOLVE_DTYPE) @ block.mv(row).to(SOLVE_DTYPE))
    return scale * total


def _error(c2: float, t: float, f2: float) -> tuple[float, float]:
    """(relative error, Frobenius cosine) from ``‖C‖²``, ``tr(CF)``, ``‖F‖²``."""
    err = math.sqrt(max(c2 - 2 * t + f2, 0.0) / f2) if f2 > 0 else float("nan")
    cos = t / math.sqrt(c2 * f2) if c2 > 0 and f2 > 0 else float("nan")
    return err, cos


def relative_errors(analysis: Analysis, method: str) -> dict[str, tuple[float, float]]:
    """Per layer and for the network: ``(‖C − F‖/‖F‖, ⟨C, F⟩/(‖C‖‖F‖))`` of ``method``.

    Layers come first (flat-layout order), then :data:`~curvlab.records.NETWORK`.

    Raises:
        ValueError: ``method`` has no curvature (``sgd``) or is not block-diagonal.
    """
    capt = analysis.capture
    if METHODS[method].matrix == "exact":
        return {name: (0.0, 1.0) for name in [*analysis.layer_names, NETWORK]}
    curv = analysis.curvature(method)
    if not isinstance(curv, LayerwiseCurvature):
        raise ValueError(f"method '{method}' has no block-diagonal curvature to compare")
    out = {}
    c2_all = t_all = 0.0
    for lc in capt.layers:
        block = curv.blocks[lc.name]
        exact_block = analysis.blockdiag.blocks[lc.name]
        c2, f2 = squared_norm(block), squared_norm(exact_block)
        if _is_exact_block(block, lc):
            out[lc.name] = (0.0, 1.0)
            t = f2
        else:
            t = trace_with_fisher(block, lc, capt.scale)
            out[lc.name] = _error(c2, t, f2)
        c2_all += c2
        t_all += t
    out[NETWORK] = _error(c2_all, t_all, squared_norm(analysis.exact))
    return out


def relative_error_records(analysis: Analysis, methods: Sequence[str]) -> list[Record]:
    """Section ``"relative_error"``: metrics ``"relative_frobenius_error"`` and
    ``"frobenius_cosine"`` against the exact Fisher (reference ``"exact"``), per layer
    and for the network, once per distinct curvature matrix (``sgd`` has none)."""
    records = []
    for method in distinct_matrices(methods):
        for layer, (err, cos) in relative_errors(analysis, method).items():
            records.append(
                Record("relative_error", "relative_frobenius_error", method, err, layer, "exact")
            )
            records.append(
                Record("relative_error", "frobenius_cosine", method, cos, layer, "exact")
            )
    return records


def distinct_matrices(methods: Sequence[str]) -> list[str]:
    """The first method of each distinct curvature matrix, leaving out ``sgd``."""
    seen: dict[str, str] = {}
    for m in methods:
        if m != "sgd":
            seen.setdefault(METHODS[m].matrix, m)
    return list(seen.values())

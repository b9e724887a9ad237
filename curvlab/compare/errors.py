"""Relative Frobenius errors ``‖C − F‖ / ‖F‖`` without forming ``P x P`` matrices.

With ``F = s U Uᵀ`` (``U``: per-column gradients) and a block-diagonal approximation
``C = ⊕_l C_l``:

    ‖C − F‖² = ‖C‖² − 2 tr(C F) + ‖F‖²,    tr(C F) = Σ_l tr(C_l F_ll),
    tr(C_l F_ll) = s Σ_{n,c} u_ncᵀ C_l u_nc,   ‖F‖ = s ‖K‖,   ‖F_ll‖ = s ‖K_l‖,

with ``K`` the full Gram ``UᵀU`` and ``K_l`` the layer's.  Off-diagonal blocks of
``F`` thus count in the whole-network error.  For a layer block diagonal in a
Kronecker eigenbasis, ``C_l = (Q_out ⊗ Q_in) diag(D) (Q_out ⊗ Q_in)ᵀ`` (KFAC, FOOF,
EKFAC), ``tr(C_l F_ll) = Σ D ∘ S`` with ``S = s Σ_nc (Q_outᵀ Γ_nc Q_in)²`` (the
EKFAC statistic, chunked over samples).  These closed forms are members of the
curvature interface (:meth:`~curvlab.Curvature.squared_frobenius_norm`,
:meth:`~curvlab.Curvature.fisher_inner`), so any registered approximation takes part.
Everything is accumulated in float64; the difference of squares loses about half the
digits of the inputs, so errors below ``sqrt(eps)`` of the model's dtype read as noise
(≈3e-4 in float32).

Also reported: the Frobenius cosine ``⟨C, F⟩ / (‖C‖ ‖F‖)``, which ignores scale
(FOOF's ``A ⊗ I`` is not meant to match ``F``'s scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from curvlab.compare.analysis import Analysis
from curvlab.compare.methods import METHODS
from curvlab.errors import OptionError
from curvlab.records import NETWORK, Record


def _error(c2: float, t: float, f2: float) -> tuple[float, float]:
    """(relative error, Frobenius cosine) from ``‖C‖²``, ``tr(CF)``, ``‖F‖²``."""
    err = math.sqrt(max(c2 - 2 * t + f2, 0.0) / f2) if f2 > 0 else float("nan")
    cos = t / math.sqrt(c2 * f2) if c2 > 0 and f2 > 0 else float("nan")
    return err, cos


def relative_errors(analysis: Analysis, method: str) -> dict[str, tuple[float, float]]:
    """Per layer and for the network: ``(‖C − F‖/‖F‖, ⟨C, F⟩/(‖C‖‖F‖))`` of ``method``.

    Layers come first (flat-layout order), then :data:`~curvlab.records.NETWORK`.

    The network value pairs the whole matrix with the full ``F``
    (``Curvature.fisher_inner`` over every layer), so a matrix with off-diagonal blocks
    is compared exactly too.

    Raises:
        ValueError: ``method`` has no curvature (``sgd``).
    """
    capt = analysis.capture
    if METHODS[method].matrix == "exact":
        return {name: (0.0, 1.0) for name in [*analysis.layer_names, NETWORK]}
    curv = analysis.curvature(method)
    if curv is None:
        raise OptionError(f"method '{method}' has no curvature to compare")
    out = {}
    for lc in capt.layers:
        block = curv.blocks[lc.name]
        exact_block = analysis.blockdiag.blocks[lc.name]
        if block is exact_block:
            out[lc.name] = (0.0, 1.0)
            continue
        c2, f2 = block.squared_frobenius_norm(), exact_block.squared_frobenius_norm()
        out[lc.name] = _error(c2, block.fisher_inner([lc], capt.scale), f2)
    c2_all = curv.squared_frobenius_norm()
    t_all = curv.fisher_inner(capt.layers, capt.scale)
    out[NETWORK] = _error(c2_all, t_all, analysis.exact.squared_frobenius_norm())
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

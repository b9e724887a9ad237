"""The split of an eigenbasis method's error into eigenbasis error and eigenvalue error.

A layer block ``C = Q diag(D) Qᵀ`` that is diagonal in an orthogonal Kronecker
eigenbasis ``Q = Q_out ⊗ Q_in`` (KFAC, EKFAC, KFOC, Shampoo, FOOF, SINGD, the
diagonals with ``Q = I``) differs from the exact block ``F`` by

    ‖C − F‖_F² = ‖diag(D) − Qᵀ F Q‖_F² = ‖D − S‖² + (‖F‖_F² − ‖S‖²),

with ``S = diag(Qᵀ F Q) = s Σ_nc (Q_outᵀ Γ_nc Q_in)²`` the exact block's diagonal in
that basis (:meth:`curvlab.Curvature.eigenbasis_statistics`).  Relative to ``‖F‖_F``:

* ``eigenbasis_error = sqrt(‖F‖² − ‖S‖²) / ‖F‖``: what no choice of eigenvalues can
  remove in this basis (the off-diagonal part of ``Qᵀ F Q``; EKFAC's error in KFAC's
  basis);
* ``eigenvalue_error = ‖D − S‖ / ‖F‖``: how far the method's eigenvalues are from the
  best ones in its own basis (0 for EKFAC).

The two add in squares to the relative Frobenius error of the block: KFAC vs EKFAC
(same basis, different eigenvalues) vs KFOC (the optimal Kronecker product, another
basis).  Network values add the layers' squares over ``Σ_l ‖F_ll‖²``, i.e. they split
the error of the block-diagonal part of ``F`` (off-diagonal blocks belong to neither).
Records: section ``"relative_error"``, reference ``"exact"``, for every distinct
matrix whose blocks all have an eigenbasis (exact blocks, e.g. of norm layers in KFAC, are
diagonal in their own eigenbasis and add no error).  The difference ``‖F‖² − ‖S‖²`` loses
about half the digits of the inputs (as the relative error does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from curvlab.compare.analysis import Analysis
from curvlab.compare.errors import distinct_matrices
from curvlab.compare.methods import METHODS
from curvlab.records import NETWORK, Record


def error_split(analysis: Analysis, method: str) -> dict[str, tuple[float, float]] | None:
    """Per layer and for the network: ``(eigenbasis_error, eigenvalue_error)`` of
    ``method`` (module docstring); ``None`` when a block has no Kronecker eigenbasis."""
    curv = analysis.curvature(method)
    if curv is None or METHODS[method].matrix in ("exact", "blockdiag"):
        return None
    capt = analysis.capture
    out = {}
    basis_all = value_all = f2_all = 0.0
    for lc in capt.layers:
        stats = curv.blocks[lc.name].eigenbasis_statistics(lc, capt.scale)
        if stats is None:
            return None
        d, s = stats
        f2 = analysis.blockdiag.blocks[lc.name].squared_frobenius_norm()
        basis = max(f2 - float(s.square().sum()), 0.0)
        value = float((d - s).square().sum())
        out[lc.name] = (
            (math.sqrt(basis / f2), math.sqrt(value / f2))
            if f2 > 0
            else (
                math.nan,
                math.nan,
            )
        )
        basis_all, value_all, f2_all = basis_all + basis, value_all + value, f2_all + f2
    if f2_all > 0:
        out[NETWORK] = (math.sqrt(basis_all / f2_all), math.sqrt(value_all / f2_all))
    else:
        out[NETWORK] = (math.nan, math.nan)
    return out


def error_split_records(analysis: Analysis, methods: Sequence[str]) -> list[Record]:
    """Metrics ``"eigenbasis_error"`` and ``"eigenvalue_error"`` (module docstring)."""
    records = []
    for method in distinct_matrices(methods):
        split = error_split(analysis, method)
        if split is None:
            continue
        for layer, (basis, value) in split.items():
            records.append(
                Record("relative_error", "eigenbasis_error", method, basis, layer, "exact")
            )
            records.append(
                Record("relative_error", "eigenvalue_error", method, value, layer, "exact")
            )
    return records

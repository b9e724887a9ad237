"""KL (LogDet) divergence between the Gaussians of the damped exact and approximate
curvature, through Woodbury and Kronecker identities (no ``P x P`` matrix).

For the exact Fisher ``F = s U Uᵀ`` (``U``: per-column gradients, ``N C'`` columns) and
an approximation ``C``, at damping ``λ``:

    KL(N(0, (F + λI)⁻¹) ‖ N(0, (C + λI)⁻¹))
      = ½ [tr((C + λI)(F + λI)⁻¹) − P + log det(F + λI) − log det(C + λI)],

a LogDet (Stein) divergence between ``F + λI`` and ``C + λI`` (0 iff ``C = F``).  With
``M = λ/s I + K`` (``K = UᵀU``, eigenpairs ``(κ_i, v_i)``) Woodbury gives
``(F + λI)⁻¹ = (I − U M⁻¹ Uᵀ) / λ``, so

    tr((C + λI)(F + λI)⁻¹) − P = (tr C − tr(M⁻¹ UᵀCU)) / λ − tr(M⁻¹ K),
    log det(F + λI) − log det(C + λI) = Σ_i log(1 + s κ_i / λ) − log det(I + C / λ),

with ``UᵀCU`` from :meth:`curvlab.Curvature.column_products` (per layer, for a
Kronecker block ``X ⊗ Y``: ``Σ_{t,t'} (e_nctᵀ X e_mdt')(ā_ntᵀ Y ā_mt')``, a Gram of
transformed inputs) and ``log det(I + C/λ)`` from
:meth:`curvlab.Curvature.logdet_ratio` (Kronecker: ``Σ log(1 + d_g d_a / λ)``).  One
eigendecomposition of ``K`` serves every ``λ``.  The KL uses ``C + λI`` for every
method (KFAC's heuristic damping is a rule of its solve, not of its matrix), so methods
that share a matrix share the KL.

Records (section ``"relative_error"``, metric ``"kl_divergence"``, reference
``"exact"``, per ``λ``): per layer against the exact diagonal block ``F_ll``, and for the
network against the full ``F``.  Accumulated in float64; the trace terms cancel to
about ``eps · tr(C) / λ`` absolute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlab.capture import LayerCapture
from curvlab.compare.analysis import Analysis
from curvlab.compare.errors import distinct_matrices
from curvlab.compare.methods import METHODS
from curvlab.curvature import Curvature, GramFisher
from curvlab.numerics import SOLVE_DTYPE
from curvlab.records import NETWORK, Record


def kl_divergences(
    exact: GramFisher,
    curv: Curvature,
    layers: Sequence[LayerCapture],
    dampings: Sequence[float],
) -> list[float]:
    """``KL(N(0, (F + λI)⁻¹) ‖ N(0, (C + λI)⁻¹))`` for each λ (module docstring).

    Args:
        exact: The exact Fisher ``F`` of ``layers`` (Gram-based).
        curv: The approximation ``C`` over the same parameters.
        layers: The captured layers both cover, in flat-layout order.
        dampings: λ values (> 0).
    """
    values, vectors = exact.gram_eigh  # eigenvalues of s K, descending
    scale = exact.scale
    kappa = (values / scale).clamp_min(0.0)
    w = curv.column_products(layers).to(SOLVE_DTYPE)
    w_diag = (vectors * (w @ vectors)).sum(dim=0)  # v_iᵀ W v_i
    trace_c = float(curv.trace().to(SOLVE_DTYPE))
    out = []
    for lam in dampings:
        denom = lam / scale + kappa
        trace_term = (trace_c - float((w_diag / denom).sum())) / lam - float((kappa / denom).sum())
        logdet_f = float(torch.log1p(scale * kappa / lam).sum())
        out.append(0.5 * (trace_term + logdet_f - curv.logdet_ratio(lam)))
    return out


def kl_records(
    analysis: Analysis, methods: Sequence[str], dampings: Sequence[float]
) -> list[Record]:
    """Metric ``"kl_divergence"`` (module docstring) for every distinct curvature matrix
    (``exact`` has 0 everywhere; ``blockdiag`` is 0 per layer)."""
    capt = analysis.capture
    records = []
    for method in distinct_matrices(methods):
        if METHODS[method].matrix == "exact":
            records += [
                Record("relative_error", "kl_divergence", method, 0.0, layer, "exact", lam)
                for layer in [*analysis.layer_names, NETWORK]
                for lam in dampings
            ]
            continue
        curv = analysis.curvature(method)
        for lc in capt.layers:
            block, exact_block = curv.blocks[lc.name], analysis.blockdiag.blocks[lc.name]
            if block is exact_block:
                values = [0.0] * len(dampings)
            else:
                values = kl_divergences(exact_block, block, [lc], dampings)
            records += [
                Record("relative_error", "kl_divergence", method, v, lc.name, "exact", lam)
                for v, lam in zip(values, dampings)
            ]
        values = kl_divergences(analysis.exact, curv, capt.layers, dampings)
        records += [
            Record("relative_error", "kl_divergence", method, v, NETWORK, "exact", lam)
            for v, lam in zip(values, dampings)
        ]
    return records

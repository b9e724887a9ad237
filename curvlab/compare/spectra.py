"""Spectra of the exact curvature and its approximations, and top eigenspace overlaps.

* Exact (Gram-based) matrices ``s U Uᵀ``: the non-zero spectrum is that of ``s K``
  (``K = UᵀU``, ``N C' x N C'``); its eigenvectors are ``U v / sqrt(λ_K)`` for the
  Gram's eigenpairs ``(λ_K, v)``.  Per layer: the exact diagonal block.
* Kronecker-eigenbasis blocks (KFAC, FOOF, EKFAC): eigenvalues ``D``, eigenvectors
  ``q_out,i ⊗ q_in,j`` (KFAC: products of the factor spectra).  Block-diagonal
  matrices: the union of their blocks' spectra.

Eigenvalues at or below the numerical-rank tolerance ``n · eps · λ_max`` of their
eigenproblem (as ``numpy.linalg.matrix_rank``; ``n`` = the Gram's size for exact
matrices, the larger Kronecker factor's for eigenbasis blocks; ``eps`` of the model's
compute dtype) are left out.

Overlap of the top-``k`` eigenspaces, for ``k = 1..top_k``:
``tr(P_X P_W) / k = ‖X_kᵀ W_k‖_F² / k`` ∈ [0, 1], with ``X_k`` the exact top-``k``
eigenvectors and ``W_k`` the approximation's (1: same subspace).  When eigenvalues tie
at the ``k``-th (FOOF's ``A ⊗ I`` repeats each eigenvalue ``d_out`` times), the tied
eigenvectors enter the projector with equal weights ``r / m`` (``r`` of the ``m`` tied
ones needed), so the overlap does not depend on the eigensolver's basis.  The
approximation's eigenvectors are never formed: ``x ↦ Q_outᵀ X Q_in`` projects the exact
ones onto Kronecker eigenbases.  Spectra and projections are members of the curvature
interface (:meth:`~curvlab.Curvature.nonzero_eigenvalues`,
:meth:`~curvlab.Curvature.eigen_projections`; other matrices fall back to a dense
eigendecomposition within the memory budget).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.compare.analysis import Analysis
from curvlab.compare.errors import distinct_matrices
from curvlab.compare.methods import METHODS
from curvlab.curvature import Curvature, GramFisher
from curvlab.curvature.base import TIE_RTOL
from curvlab.records import NETWORK, Record


def nonzero_spectrum(analysis: Analysis, curv: Curvature) -> Tensor:
    """The numerically non-zero eigenvalues of ``curv``, descending, float64
    (:meth:`curvlab.Curvature.nonzero_eigenvalues`)."""
    return curv.nonzero_eigenvalues().sort(descending=True).values


def _layer_matrices(methods: Sequence[str]) -> list[str]:
    """One method per distinct per-layer matrix (``exact`` and ``blockdiag`` share them)."""
    seen: dict[str, str] = {}
    for m in distinct_matrices(methods):
        key = "exact" if METHODS[m].matrix in ("exact", "blockdiag") else METHODS[m].matrix
        seen.setdefault(key, m)
    return list(seen.values())


def spectrum_records(
    analysis: Analysis,
    methods: Sequence[str],
    per_layer: bool = True,
    max_eigenvalues: int | None = None,
) -> list[Record]:
    """Section ``"spectrum"``, metric ``"eigenvalue"``: index = rank (0 = largest).

    Args:
        analysis: The captured problem.
        methods: Methods to include (one per distinct matrix; ``sgd`` has none).
        per_layer: Also each layer's diagonal block.
        max_eigenvalues: Keep only the largest this many per spectrum (``None``: all);
            ``extra["num_nonzero"]`` records the full count.
    """
    records = []
    targets = [(NETWORK, m) for m in distinct_matrices(methods)]
    if per_layer:
        targets += [(layer, m) for layer in analysis.layer_names for m in _layer_matrices(methods)]
    for layer, method in targets:
        curv = analysis.curvature(method) if layer == NETWORK else analysis.block(method, layer)
        label = "exact" if layer != NETWORK and METHODS[method].matrix == "blockdiag" else method
        values = nonzero_spectrum(analysis, curv)
        extra = {"num_nonzero": int(values.numel())}
        for i, v in enumerate(values[:max_eigenvalues].tolist()):
            records.append(
                Record("spectrum", "eigenvalue", label, v, layer, index=i, extra=dict(extra))
            )
    return records


def top_eigenvectors(analysis: Analysis, curv: GramFisher, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` numerically non-zero eigenvalues (descending, plus any tied with the
    ``k``-th) of an exact Gram-based matrix and its unit eigenvectors ``(P, m)``, float64
    (:meth:`curvlab.GramFisher.top_eigenvectors`)."""
    return curv.top_eigenvectors(k)


def tie_weights(values: Tensor, k: int) -> Tensor:
    """Weights of the descending eigenvalues in the top-``k`` eigenspace: 1 above the
    ``k``-th value, ``r / m`` for the ``m`` values tied with it of which ``r`` are needed."""
    kth = values[k - 1]
    tol = TIE_RTOL * values[0]
    above = values > kth + tol
    tied = (values - kth).abs() <= tol
    return above.to(values.dtype) + tied.to(values.dtype) * (k - int(above.sum())) / int(tied.sum())


def overlap(exact_values: Tensor, approx_values: Tensor, projections: Tensor, top_k: int) -> Tensor:
    """``tr(P_X(k) P_W(k)) / k`` for ``k = 1..K``: the overlap of the two top-``k``
    eigenspaces, with tied eigenvalues at the ``k``-th weighted evenly (:func:`tie_weights`).

    Args:
        exact_values: Descending eigenvalues ``(m_x,)`` of the exact matrix.
        approx_values: Descending eigenvalues ``(m_w,)`` of the approximation.
        projections: ``x_iᵀ u_j`` of their unit eigenvectors, ``(m_x, m_w)``.
        top_k: Largest ``k``; ``K`` = the smallest of ``top_k``, ``m_x``, ``m_w``.
    """
    top = min(top_k, exact_values.numel(), approx_values.numel())
    squared = projections.square()
    out = []
    for k in range(1, top + 1):
        a, b = tie_weights(exact_values, k), tie_weights(approx_values, k)
        out.append(a @ squared @ b / k)
    return torch.stack(out) if out else projections.new_zeros(0)


def overlap_records(analysis: Analysis, methods: Sequence[str], top_k: int = 10) -> list[Record]:
    """Section ``"spectrum"``, metric ``"top_k_overlap"`` (reference ``"exact"``,
    index = ``k``), whole network and per layer, for every distinct approximation."""
    records = []
    for layer in [NETWORK, *analysis.layer_names]:
        exact = analysis.exact if layer == NETWORK else analysis.block("exact", layer)
        exact_values, x = exact.top_eigenvectors(top_k)
        candidates = distinct_matrices(methods) if layer == NETWORK else _layer_matrices(methods)
        for method in candidates:
            if METHODS[method].matrix == "exact" or (
                layer != NETWORK and METHODS[method].matrix == "blockdiag"
            ):
                continue
            curv = analysis.curvature(method) if layer == NETWORK else analysis.block(method, layer)
            values, proj = curv.eigen_projections(x, top_k)
            for k, value in enumerate(overlap(exact_values, values, proj, top_k).tolist(), 1):
                records.append(
                    Record("spectrum", "top_k_overlap", method, value, layer, "exact", index=k)
                )
    return records

"""Cosine similarity of update directions, Euclidean or in a curvature's inner product.

For directions ``x``, ``y`` and a PSD matrix ``M`` (``I`` for Euclidean):

    cos_M(x, y) = xᵀ M y / sqrt(xᵀ M x · yᵀ M y).

With ``M`` = FOOF's ``A ⊗ I`` this is the similarity Benzing (2022, Fig. 3B) reports
between KFAC and FOOF.  Per layer, ``x``, ``y`` are the layer's slices and ``M`` the
layer's diagonal block.  A zero norm gives NaN.

Records (section ``"cosine"``): metric ``"cosine"`` (Euclidean) or ``"cosine_<m>"``
(inner product of method ``m``'s curvature), method, reference, layer (or
``"network"``), damping λ (every method's direction is ``solve(g, λ)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.compare.analysis import Analysis
from curvlab.curvature import Curvature
from curvlab.records import NETWORK, Record


def cosine(x: Tensor, y: Tensor, inner: Curvature | None = None) -> float:
    """``cos_M(x, y)`` for flat vectors ``x``, ``y`` (``M = I`` when ``inner`` is None)."""
    return float(cosine_matrix([x, y], inner)[0, 1])


def cosine_matrix(vectors: Sequence[Tensor], inner: Curvature | None = None) -> Tensor:
    """All pairwise ``cos_M`` of ``k`` flat vectors, ``(k, k)`` in float64.

    ``M v`` is evaluated once per vector; rows with ``vᵀ M v = 0`` are NaN.
    """
    v = torch.stack([x.detach().to(torch.float64) for x in vectors])
    if inner is None:
        mv = v
    else:
        mv = torch.stack([inner.mv(x.to(inner.dtype)).to(torch.float64) for x in v])
    gram = v @ mv.T
    gram = (gram + gram.T) / 2
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    return torch.where(denom > 0, gram / denom, torch.full_like(gram, float("nan")))


def cosine_records(
    analysis: Analysis,
    methods: Sequence[str],
    dampings: Sequence[float],
    reference: str = "exact",
    inner_products: Sequence[str] = ("foof",),
    pairwise: bool = True,
) -> list[Record]:
    """Cosines of every method's direction against ``reference`` (or every other method
    when ``pairwise``), whole network and per layer, for each damping and inner product.

    Args:
        analysis: The captured problem.
        methods: Methods whose directions are compared (``reference`` among them).
        dampings: λ values; each gives one direction per method.
        reference: The method compared against when ``pairwise`` is false.
        inner_products: Methods whose curvature defines an extra inner product.
        pairwise: Compare every ordered pair of distinct methods.
    """
    methods = list(methods)
    references = methods if pairwise else [reference]
    records = []
    for lam in dampings:
        directions = [analysis.direction(m, lam) for m in methods]
        for layer in [NETWORK, *analysis.layer_names]:
            parts = [analysis.layer_part(d, layer) for d in directions]
            for inner in [None, *inner_products]:
                if inner is None:
                    metric, matrix = "cosine", None
                else:
                    metric = f"cosine_{inner}"
                    matrix = (
                        analysis.curvature(inner)
                        if layer == NETWORK
                        else analysis.block(inner, layer)
                    )
                cos = cosine_matrix(parts, matrix)
                for i, m in enumerate(methods):
                    for ref in references:
                        if ref == m:
                            continue
                        value = float(cos[i, methods.index(ref)])
                        records.append(
                            Record("cosine", metric, m, value, layer, reference=ref, damping=lam)
                        )
    return records

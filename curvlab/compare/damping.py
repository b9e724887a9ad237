"""Effects of damping over a λ grid (section ``"damping"``).

Metrics, each recorded per λ:

* ``"cosine"`` (reference = the comparison's reference, network): every method's
  direction against the reference's, e.g. KFAC with heuristic vs standard damping
  against the exact natural gradient (Benzing 2022, Fig. 3A);
* ``"cosine"`` and ``"cosine_foof"`` (reference = the FOOF variant ``foof``, network;
  when the methods include a FOOF variant, i.e. a method with FOOF's matrix): every
  other Kronecker-factored method (``Curvature.kronecker_factored``: the KFAC variants
  and the other Kronecker approximations) against FOOF, Euclidean and in FOOF's inner
  product ``A ⊗ I`` (Fig. 3B).  By default FOOF is the paper's, ``foof-kfac-damping``
  (``∇W (A + π√λ I)⁻¹``, KFAC's own A-side damping); ``"foof"`` (``A + λI``) is nearly
  undamped next to it once π grows during training;
* ``"cross_terms_ratio"`` (per layer and network, those Kronecker-factored methods
  whose damping rule is not ``C + λI``, ``Curvature.damping_excess``): for KFAC's
  heuristic damping ``‖π√λ I⊗G + A⊗(√λ/π) I‖_F / ‖λ I‖_F`` — how much the factored
  Tikhonov damping ``(A + π√λ I) ⊗ (G + √λ/π I)`` adds beyond ``A ⊗ G + λI``; the
  network value combines the layers' squared norms;
* ``"effective_step_size"`` (per layer and network, every method):
  ``‖d_l(λ)‖ / ‖g_l‖``, the step length per unit learning rate relative to SGD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from curvlab.compare.analysis import Analysis
from curvlab.compare.cosine import cosine_matrix
from curvlab.methods import METHODS
from curvlab.records import NETWORK, Record

FOOF_REFERENCE = "foof-kfac-damping"
"""The FOOF of the KFAC-vs-FOOF cosines by default (Benzing 2022, App. D.9)."""


def _is_foof(method: str) -> bool:
    """A FOOF variant: a method whose matrix is FOOF's ``A ⊗ I``."""
    return METHODS[method].matrix == "foof"


def _kronecker_methods(analysis: Analysis, methods: Sequence[str]) -> list[str]:
    """Methods other than the FOOF variants whose every layer block is one Kronecker
    product."""
    found = []
    for m in methods:
        curv = analysis.curvature(m)
        if not _is_foof(m) and curv is not None and curv.kronecker_factored:
            found.append(m)
    return found


def damping_records(
    analysis: Analysis,
    methods: Sequence[str],
    dampings: Sequence[float],
    reference: str = "exact",
    foof: str = FOOF_REFERENCE,
) -> list[Record]:
    """The records described in the module docstring, for every λ in ``dampings``;
    ``foof`` names the FOOF variant of the KFAC-vs-FOOF cosines."""
    records = []
    kfacs = _kronecker_methods(analysis, methods)
    for lam in dampings:
        ref = analysis.direction(reference, lam)
        for m in methods:
            if m != reference:
                value = float(cosine_matrix([analysis.direction(m, lam), ref])[0, 1])
                records.append(
                    Record("damping", "cosine", m, value, reference=reference, damping=lam)
                )
        if any(_is_foof(m) for m in methods):
            foof_dir = analysis.direction(foof, lam)
            for m in kfacs:
                pair = [analysis.direction(m, lam), foof_dir]
                for metric, inner in (
                    ("cosine", None),
                    ("cosine_foof", analysis.curvature(foof)),
                ):
                    value = float(cosine_matrix(pair, inner)[0, 1])
                    records.append(Record("damping", metric, m, value, reference=foof, damping=lam))
        records += _cross_terms(analysis, kfacs, lam)
        records += _step_sizes(analysis, methods, lam)
    return records


def _cross_terms(analysis: Analysis, methods: Sequence[str], lam: float) -> list[Record]:
    records = []
    for m in methods:
        curv = analysis.curvature(m)
        if curv is None or curv.damping_excess(lam) is None:
            continue
        total_sq = 0.0
        for layer, block in curv.blocks.items():
            excess = block.damping_excess(lam)
            norm = 0.0 if excess is None else float(excess)
            total_sq += norm**2
            ratio = norm / (lam * math.sqrt(block.num_params))
            records.append(Record("damping", "cross_terms_ratio", m, ratio, layer, damping=lam))
        ratio = math.sqrt(total_sq) / (lam * math.sqrt(curv.num_params))
        records.append(Record("damping", "cross_terms_ratio", m, ratio, NETWORK, damping=lam))
    return records


def _step_sizes(analysis: Analysis, methods: Sequence[str], lam: float) -> list[Record]:
    records = []
    g = analysis.capture.grad.to(torch.float64)
    for m in methods:
        d = analysis.direction(m, lam)
        for layer in [NETWORK, *analysis.layer_names]:
            g_norm = float(analysis.layer_part(g, layer).norm())
            d_norm = float(analysis.layer_part(d, layer).norm())
            value = d_norm / g_norm if g_norm > 0 else float("nan")
            records.append(Record("damping", "effective_step_size", m, value, layer, damping=lam))
    return records

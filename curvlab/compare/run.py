"""``compare``: every comparison section from one capture, as tidy records.

Sections (:data:`SECTIONS`) and the modules that compute them:

* ``"cosine"`` (:mod:`~curvlab.compare.cosine`): update-direction cosines;
* ``"relative_error"`` (:mod:`~curvlab.compare.errors`): ``‖C − F‖ / ‖F‖`` and the
  matrix cosine; :mod:`~curvlab.compare.divergence`: the damped KL (LogDet) divergence;
  :mod:`~curvlab.compare.eigen_split`: eigenbasis vs eigenvalue error;
* ``"spectrum"`` (:mod:`~curvlab.compare.spectra`): spectra and top-k eigenspace overlap;
* ``"damping"`` (:mod:`~curvlab.compare.damping`): effects of λ;
* ``"progress"`` (:mod:`~curvlab.compare.progress`): loss decrease after one step;
* ``"kfc_check"`` (:mod:`~curvlab.compare.kfc_checks`): KFC assumptions per conv layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvlab.compare.analysis import Analysis
from curvlab.compare.cosine import cosine_records
from curvlab.compare.damping import damping_records
from curvlab.compare.divergence import kl_records
from curvlab.compare.eigen_split import error_split_records
from curvlab.compare.errors import relative_error_records
from curvlab.compare.kfc_checks import kfc_check_records
from curvlab.compare.methods import DEFAULT_METHODS, METHODS, check_methods
from curvlab.compare.progress import progress_records
from curvlab.compare.spectra import overlap_records, spectrum_records
from curvlab.errors import OptionError
from curvlab.records import Record

SECTIONS = ("cosine", "relative_error", "spectrum", "damping", "progress", "kfc_check")
"""Every section :func:`compare` can compute, in report order."""

DEFAULT_DAMPING = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""The λ grid compared when none is given."""

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""Learning rates tried per step in the progress section."""


def check_sections(names: Sequence[str]) -> list[str]:
    """Validate section names; returned in :data:`SECTIONS` order.

    Raises:
        ValueError: an unknown or no section; the message lists the valid names.
    """
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        what = f"unknown section '{unknown[0]}'" if unknown else "no section given"
        raise OptionError(f"{what}; choose from {', '.join(SECTIONS)}")
    return [s for s in SECTIONS if s in names]


def check_positive(values: Sequence[float], what: str) -> tuple[float, ...]:
    """Validate a grid of finite positive numbers; returned sorted, without duplicates.

    Raises:
        ValueError: an empty grid or a value that is not finite and > 0.
    """
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        if not (math.isfinite(x) and x > 0):
            raise OptionError(f"bad {what} {v!r}; every {what} must be a finite number > 0")
        out.append(x)
    if not out:
        raise OptionError(f"no {what} given; pass at least one finite number > 0")
    return tuple(sorted(set(out)))


def compare(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    fisher: str = "exact",
    damping: Sequence[float] = DEFAULT_DAMPING,
    reference: str = "exact",
    sections: Sequence[str] = SECTIONS,
    *,
    inner_products: Sequence[str] = ("foof",),
    pairwise: bool = True,
    mc_samples: int = 1,
    seed: int = 0,
    lrs: Sequence[float] = DEFAULT_LRS,
    rescale_to: str | None = None,
    top_k: int = 10,
    max_eigenvalues: int | None = None,
    kfc_max_params: int = 1536,
    progress: bool = True,
) -> list[Record]:
    """Compare curvature methods on one batch; one capture feeds every section.

    Args:
        model: The network (see :func:`curvlab.capture` for what is supported); left
            unchanged.
        loss_fn: A supported loss.
        inputs: The batch, on the model's device.
        targets: Its targets.
        methods: Names from :data:`~curvlab.compare.methods.METHODS`; ``reference`` is
            added in front when missing.
        fisher: ``"exact"`` (type-2 Fisher = GGN), ``"mc"`` or ``"empirical"``; the
            reference curvature ``F`` and every approximation use it.
        damping: The λ grid (finite, > 0); every method's direction is ``solve(g, λ)``.
        reference: Method the directions are compared against (cosine, damping).
        sections: Which of :data:`SECTIONS` to compute.
        inner_products: Methods whose curvature defines extra cosine inner products.
        pairwise: Cosines between every pair of methods, not only against ``reference``.
        mc_samples: Sampled labels per input for ``fisher="mc"``.
        seed: Seeds the label sampling for ``fisher="mc"``.
        lrs: Learning rates tried in the progress section (a single value measures
            progress at that fixed learning rate).
        rescale_to: Also measure progress with every step rescaled per layer to this
            method's norms.
        top_k: Eigenvectors compared in the top-k eigenspace overlap.
        max_eigenvalues: Largest eigenvalues kept per spectrum (``None``: all).
        kfc_max_params: Largest conv block checked densely by the KFC checks.
        progress: Show a progress bar.

    Returns:
        Records (:class:`~curvlab.records.Record`), sections in :data:`SECTIONS` order.

    Raises:
        ValueError: an unknown method, section or inner product, or a bad grid.
    """
    methods = check_methods([reference, *methods] if reference not in methods else methods)
    sections = check_sections(sections)
    dampings = check_positive(damping, "damping")
    lrs = check_positive(lrs, "learning rate")
    with_curvature = [m for m in METHODS if m != "sgd"]
    for name in inner_products:
        if name not in with_curvature:
            raise OptionError(
                f"unknown inner product '{name}'; choose from {', '.join(with_curvature)}"
            )
    if rescale_to is not None:
        check_methods([rescale_to])
    if int(top_k) != top_k or top_k < 1:
        raise OptionError(f"top_k must be a positive integer, got {top_k!r}")
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    analysis = Analysis(model, loss_fn, inputs, targets, fisher, mc_samples, generator)
    tasks = {
        "cosine": lambda: cosine_records(
            analysis, methods, dampings, reference, inner_products, pairwise
        ),
        "relative_error": lambda: (
            relative_error_records(analysis, methods)
            + kl_records(analysis, methods, dampings)
            + error_split_records(analysis, methods)
        ),
        "spectrum": lambda: (
            spectrum_records(analysis, methods, True, max_eigenvalues)
            + overlap_records(analysis, methods, top_k)
        ),
        "damping": lambda: damping_records(analysis, methods, dampings, reference),
        "progress": lambda: progress_records(analysis, methods, dampings, lrs, rescale_to),
        "kfc_check": lambda: kfc_check_records(analysis, max_params=kfc_max_params),
    }
    records: list[Record] = []
    with tqdm(sections, desc="compare", disable=not progress, leave=False) as bar:
        for section in bar:
            bar.set_postfix_str(section)
            records += tasks[section]()
    return records

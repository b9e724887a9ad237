"""Eigenvalue spectra of the exact curvature and its approximations, overlaid."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvlab.errors import DataError, OptionError
from curvlab.plots.select import Records, select
from curvlab.plots.style import (
    coincidence_label,
    coinciding,
    legend,
    method_color,
    method_order,
    new_figure,
    styled,
)
from curvlab.records import NETWORK

KINDS = ("rank", "density")

DASHES = ((0, (4, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (2, 3)), (0, (8, 3)))
"""Dash patterns of the approximations, in method order."""


@styled
def plot_spectra(
    records: Records,
    *,
    layer: str = NETWORK,
    kind: str = "rank",
    bins: int = 40,
) -> Figure:
    """Spectra from section ``"spectrum"``, metric ``"eigenvalue"``, one curve per method.

    ``kind="rank"`` plots each method's eigenvalues sorted in descending order
    against their rank; ``kind="density"`` plots, over ``bins`` log-spaced bins,
    the fraction of each method's eigenvalues per bin.  The eigenvalue axis is
    logarithmic, so values ≤ 0
    (numerically zero directions) are left out.  The exact spectrum is drawn
    solid and on top, approximations with a dash pattern each, so that one drawn over
    another still shows; a spectrum that coincides with an earlier one is marked in the
    legend (``"ekfac (≈ kfac)"``).  Each method must contribute one
    spectrum (filter the records first when there are several, e.g. per seed).
    """
    caller = "plot_spectra"
    if kind not in KINDS:
        raise OptionError(f"{caller}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    rows = select(records, "spectrum", caller, metrics=["eigenvalue"], layer=layer)
    indexed = rows.dropna(subset=["index"])
    if indexed.duplicated(["method", "index"]).any():
        raise DataError(
            f"{caller}: some method has several eigenvalues at one index (several spectra); "
            "filter the records to one spectrum per method"
        )
    spectra: dict[str, np.ndarray] = {}
    for method in method_order(rows["method"]):
        values = rows.loc[rows["method"] == method, "value"].to_numpy(dtype=float)
        spectra[method] = np.sort(values[np.isfinite(values) & (values > 0)])[::-1]
    if not any(len(s) for s in spectra.values()):
        raise DataError(f"{caller}: no finite positive eigenvalue to show on a log axis")
    fig, axes = new_figure()
    ax = axes[0, 0]
    positive = np.concatenate([s for s in spectra.values() if len(s)])
    edges = np.geomspace(positive.min(), positive.max() * (1 + 1e-9), bins + 1)
    approximations = [m for m, v in spectra.items() if len(v) and m != "exact"]
    if kind == "rank":
        logs = {m: np.log10(v) for m, v in spectra.items() if len(v)}
    else:
        logs = {m: np.histogram(v, edges)[0] / len(v) for m, v in spectra.items() if len(v)}
    hidden = coinciding(logs)
    for method, values in spectra.items():
        if not len(values):
            continue
        exact = method == "exact"
        k = approximations.index(method) if not exact else 0
        style = dict(
            color=method_color(method),
            label=coincidence_label(method, hidden),
            linestyle="-" if exact else DASHES[k % len(DASHES)],
            linewidth=1.6 if exact else 1.1,
            zorder=3 if exact else 2,
        )
        if kind == "rank":
            ax.plot(np.arange(1, len(values) + 1), values, **style)
        else:
            counts, _ = np.histogram(values, edges)
            ax.stairs(counts / len(values), edges, **style)
    if kind == "rank":
        ax.set_yscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("fraction of eigenvalues")
    ax.set_title(layer)
    legend(ax)
    return fig

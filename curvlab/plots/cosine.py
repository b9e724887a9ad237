"""Heatmap of cosine similarities between update directions: methods x references."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import ONE_COLUMN, TWO_COLUMN, method_order, new_figure, styled
from curvlab.records import NETWORK

_NO_REFERENCE = "(none)"


@styled
def plot_cosine_heatmap(
    records: Records,
    *,
    metric: str = "cosine",
    layer: str = NETWORK,
    damping: float | None = None,
    annotate: bool = True,
) -> Figure:
    """Matrix of ``metric`` from section ``"cosine"``: one row per method, one column per
    reference, for one layer (the whole network by default), each cell annotated.

    Repeated rows (e.g. seeds) are averaged; several damping values must be narrowed
    down with ``damping``.  Missing pairs are left blank.
    """
    caller = "plot_cosine_heatmap"
    rows = select(records, "cosine", caller, metrics=[metric], layer=layer, damping=damping)
    rows = rows.assign(reference=rows["reference"].fillna(_NO_REFERENCE))
    table = reduce(rows, ["method", "reference"], caller)
    methods = method_order(table["method"])
    references = method_order(table["reference"])
    matrix = (
        table.pivot(index="method", columns="reference", values="value")
        .reindex(index=methods, columns=references)
        .to_numpy(dtype=float)
    )
    width = min(TWO_COLUMN, max(ONE_COLUMN, 1.6 + 0.55 * len(references)))
    fig, axes = new_figure(width=width, height=0.7 + 0.28 * len(methods))
    ax = axes[0, 0]
    ax.grid(False)
    low = min(0.0, float(np.nanmin(matrix)))
    cmap = mpl.colormaps[mpl.rcParams["image.cmap"]].with_extremes(bad="#eeeeee")
    image = ax.imshow(matrix, cmap=cmap, vmin=low, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(references)), references, rotation=90)
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("reference")
    ax.set_ylabel("method")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                r, g, b, _ = image.cmap(image.norm(value))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                    fontsize=6.5,
                )
    fig.colorbar(image, ax=ax, label=metric.replace("_", " "), shrink=0.9)
    title = layer if damping is None else f"{layer}, λ = {damping:g}"
    ax.set_title(title)
    return fig

"""Training curves and per-step diagnostics: a metric against the step, one line per method."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvlab.errors import DataError
from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import (
    legend,
    log_scale,
    method_color,
    method_order,
    new_figure,
    shown_values,
    styled,
)


@styled
def plot_training(
    records: Records,
    *,
    metric: str = "train_loss",
    logy: bool = True,
    damping: float | None = None,
    section: str = "train",
) -> Figure:
    """``metric`` of ``section`` (``"train"`` or ``"trajectory"``) against ``index`` (the
    step), one line per method.

    The value axis is logarithmic when ``logy`` and every finite value is positive;
    infinite and NaN values leave gaps in the lines.
    Repeated rows (e.g. seeds) are averaged; records without an index are left out.
    """
    caller = "plot_training"
    rows = select(records, section, caller, metrics=[metric], damping=damping)
    rows = rows.dropna(subset=["index"])
    if rows.empty:
        raise DataError(f"{caller}: no '{metric}' record has a step (index)")
    table = reduce(rows, ["method", "index"], caller)
    fig, axes = new_figure()
    ax = axes[0, 0]
    for method in method_order(table["method"]):
        line = table[table["method"] == method].sort_values("index")
        ax.plot(
            line["index"], shown_values(line["value"]), color=method_color(method), label=method
        )
    finite = table["value"][np.isfinite(table["value"])]
    if logy and (finite > 0).all():
        log_scale(ax, "y", finite)
    ax.set_xlabel("step")
    ax.set_ylabel(metric.replace("_", " "))
    legend(ax)
    return fig

"""Progress of one update step per method (e.g. relative loss decrease) as bars."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import method_color, method_order, new_figure, styled


@styled
def plot_progress(
    records: Records,
    *,
    metric: str | None = None,
    layer: str | None = None,
    reference: str | None = None,
    damping: float | None = None,
) -> Figure:
    """Section ``"progress"``: one bar per method, annotated with its value.

    ``metric`` may be left out when the section holds a single metric.  Each method
    may use its own damping; one method at several damping values must be narrowed
    down with ``damping``.  Repeated rows are averaged.
    """
    caller = "plot_progress"
    rows = select(
        records,
        "progress",
        caller,
        metrics=None if metric is None else [metric],
        layer=layer,
        reference=reference,
        damping=damping,
    )
    found = list(dict.fromkeys(rows["metric"]))
    if len(found) > 1:
        raise ValueError(
            f"{caller}: the 'progress' records hold several metrics "
            f"({', '.join(map(repr, found))}); pass metric=... to plot one"
        )
    table = reduce(rows, ["method"], caller)
    methods = method_order(table["method"])
    values = table.set_index("method")["value"].reindex(methods).to_numpy(dtype=float)
    fig, axes = new_figure(width="two" if len(methods) > 8 else "one")
    ax = axes[0, 0]
    positions = np.arange(len(methods))
    bars = ax.bar(positions, values, color=[method_color(m) for m in methods], width=0.7)
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=6.5, padding=1.5)
    ax.axhline(0.0, color="#000000", linewidth=0.6)
    ax.set_xticks(positions, methods, rotation=30 if len(methods) > 4 else 0)
    ax.set_ylabel(found[0].replace("_", " "))
    ax.grid(axis="x", visible=False)
    return fig

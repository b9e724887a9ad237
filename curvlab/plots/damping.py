"""Damping sweeps: a measured quantity against the damping λ, per method and metric."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import (
    LINESTYLES,
    key_handles,
    legend,
    method_color,
    method_marker,
    method_order,
    new_figure,
    styled,
)
from curvlab.records import NETWORK


@styled
def plot_damping_sweep(
    records: Records,
    *,
    metrics: Sequence[str] | None = None,
    layer: str = NETWORK,
    reference: str | None = None,
    logy: bool = False,
) -> Figure:
    """Section ``"damping"``: value against damping (log axis), one line per (method, metric).

    Colour and marker encode the method, line style the metric.  Records without a
    positive damping are left out; repeated rows (e.g. seeds) are averaged.

    Args:
        records: Records or their DataFrame.
        metrics: Metrics to show (default: all in the section).
        layer: Layer whose records to show (default: the whole network).
        reference: Narrow down to one reference method when several are present.
        logy: Logarithmic value axis.
    """
    caller = "plot_damping_sweep"
    rows = select(records, "damping", caller, metrics=metrics, layer=layer, reference=reference)
    rows = rows[rows["damping"] > 0]
    if rows.empty:
        raise ValueError(f"{caller}: no 'damping' record has a positive damping value")
    table = reduce(rows, ["method", "metric", "damping"], caller)
    metric_names = list(dict.fromkeys(table["metric"]))
    fig, axes = new_figure()
    ax = axes[0, 0]
    for method in method_order(table["method"]):
        for k, metric in enumerate(metric_names):
            line = table[(table["method"] == method) & (table["metric"] == metric)]
            if line.empty:
                continue
            line = line.sort_values("damping")
            ax.plot(
                line["damping"],
                line["value"],
                color=method_color(method),
                marker=method_marker(method),
                linestyle=LINESTYLES[k % len(LINESTYLES)],
            )
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("damping λ")
    ax.set_ylabel(metric_names[0].replace("_", " ") if len(metric_names) == 1 else "value")
    ax.set_title(layer if reference is None else f"{layer}, vs {reference}")
    methods = [
        (m, {"color": method_color(m), "marker": method_marker(m)})
        for m in method_order(table["method"])
    ]
    metrics = [
        (m, {"color": "#666666", "linestyle": LINESTYLES[k % len(LINESTYLES)]})
        for k, m in enumerate(metric_names)
    ]
    legend(ax, key_handles(methods + (metrics if len(metrics) > 1 else [])))
    return fig

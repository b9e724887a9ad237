"""Damping sweeps: a measured quantity against the damping λ, per method and metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from curvlab.errors import DataError
from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import (
    LINESTYLES,
    coincidence_label,
    coinciding,
    dodge,
    key_handles,
    legend,
    log_scale,
    method_color,
    method_marker,
    method_order,
    new_figure,
    shown_values,
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

    Colour and marker encode the method, line style the metric.  Methods are shifted by a
    small factor along λ (a few hundredths of a decade) so that equal values stay visible
    side by side, and a method whose line coincides with an earlier one is marked in the
    legend (``"ekfac (≈ kfac-standard)"``).  Records without a
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
        raise DataError(f"{caller}: no 'damping' record has a positive damping value")
    table = reduce(rows, ["method", "metric", "damping"], caller)
    metric_names = list(dict.fromkeys(table["metric"]))
    methods = method_order(table["method"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    hidden: dict[str, list[str]] = {}
    shown: list[float] = []
    for k, metric in enumerate(metric_names):
        lines = {
            method: table[(table["method"] == method) & (table["metric"] == metric)].sort_values(
                "damping"
            )
            for method in methods
        }
        lines = {m: line for m, line in lines.items() if not line.empty}
        values = {m: shown_values(line["value"], log=logy) for m, line in lines.items()}
        shown.extend(v for line in values.values() for v in line)
        compared = {m: np.log10(v) for m, v in values.items()} if logy else values
        for name, others in coinciding(compared).items():
            hidden.setdefault(name, []).extend(o for o in others if o not in hidden.get(name, []))
        for j, (method, line) in enumerate(lines.items()):
            ax.plot(
                dodge(line["damping"].to_numpy(), j, len(lines)),
                values[method],
                color=method_color(method),
                marker=method_marker(method),
                linestyle=LINESTYLES[k % len(LINESTYLES)],
            )
    ax.set_xscale("log")
    if logy:
        log_scale(ax, "y", shown)
    ax.set_xlabel("damping λ")
    ax.set_ylabel(_axis_label(metric_names))
    ax.set_title(layer if reference is None else f"{layer}, vs {reference}")
    methods = [
        (coincidence_label(m, hidden), {"color": method_color(m), "marker": method_marker(m)})
        for m in methods
    ]
    metrics = [
        (m, {"color": "#666666", "linestyle": LINESTYLES[k % len(LINESTYLES)]})
        for k, m in enumerate(metric_names)
    ]
    legend(ax, key_handles(methods + (metrics if len(metrics) > 1 else [])))
    return fig


def _axis_label(metrics: Sequence[str]) -> str:
    """``cosine`` for cosines in several inner products, the metric's name for one metric."""
    if all(m == "cosine" or m.startswith("cosine_") for m in metrics):
        return "cosine"
    return metrics[0].replace("_", " ") if len(metrics) == 1 else "value"

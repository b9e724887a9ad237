"""Checks of the KFC assumptions for conv layers (Grosse & Martens 2016)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from curvlab.errors import DataError
from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import (
    LINE_COLORS,
    LINESTYLES,
    MARKERS,
    key_handles,
    legend,
    new_figure,
    styled,
)

ERROR_METRICS = ("iad", "iad_sh", "kfc")
"""Relative errors of the approximations: independent activations and derivatives (IAD),
IAD with spatial homogeneity (IAD+SH), and the full KFC approximation."""

CORRELATION_METRICS = ("corr_activations", "corr_derivatives")
"""Spatial correlations of activations / derivatives; ``index`` is the offset."""

_ERROR_COLORS = {"iad": "#0072B2", "iad_sh": "#E69F00", "kfc": "#009E73"}


@styled
def plot_kfc_checks(
    records: Records,
    *,
    method: str | None = None,
    damping: float | None = None,
) -> Figure:
    """Section ``"kfc_check"``: up to two panels.

    Left: relative errors (metrics :data:`ERROR_METRICS`) per conv layer as grouped
    bars.  Right: spatial correlation against offset (``index``) for
    :data:`CORRELATION_METRICS`, colour per layer, solid for activations and dashed
    for derivatives.  A panel without records is left out.
    """
    caller = "plot_kfc_checks"
    rows = select(
        records,
        "kfc_check",
        caller,
        metrics=ERROR_METRICS + CORRELATION_METRICS,
        method=method,
        damping=damping,
    )
    errors = rows[rows["metric"].isin(ERROR_METRICS)]
    correlations = rows[rows["metric"].isin(CORRELATION_METRICS)].dropna(subset=["index"])
    panels = int(not errors.empty) + int(not correlations.empty)
    if panels == 0:
        raise DataError(f"{caller}: the correlation records have no offset (index)")
    fig, axes = new_figure(1, panels, width="two" if panels == 2 else "one")
    column = 0
    if not errors.empty:
        _error_bars(axes[0, column], reduce(errors, ["layer", "metric"], caller))
        column += 1
    if not correlations.empty:
        _correlations(axes[0, column], reduce(correlations, ["layer", "metric", "index"], caller))
    return fig


def _error_bars(ax: Axes, table: pd.DataFrame) -> None:
    """Grouped bars: one group per layer, one bar per error metric."""
    layers = list(dict.fromkeys(table["layer"]))
    metrics = [m for m in ERROR_METRICS if m in set(table["metric"])]
    bar = 0.8 / len(metrics)
    positions = np.arange(len(layers))
    for k, metric in enumerate(metrics):
        values = table[table["metric"] == metric].set_index("layer")["value"].reindex(layers)
        ax.bar(
            positions + (k - (len(metrics) - 1) / 2) * bar,
            values.to_numpy(dtype=float),
            width=bar,
            color=_ERROR_COLORS[metric],
            label=metric.replace("_", "+").upper(),
        )
    ax.set_xticks(positions, layers, rotation=90 if len(layers) > 4 else 0)
    ax.set_xlabel("conv layer")
    ax.set_ylabel("relative error")
    ax.grid(axis="x", visible=False)
    legend(ax)


def _correlations(ax: Axes, table: pd.DataFrame) -> None:
    """Correlation against offset: colour and marker per layer, line style per metric;
    layers are shifted slightly along the offset axis so that equal values (e.g. derivative
    correlations of 0) stay visible side by side."""
    layer_names = list(dict.fromkeys(table["layer"]))
    for i, layer in enumerate(layer_names):
        for metric in CORRELATION_METRICS:
            line = table[(table["layer"] == layer) & (table["metric"] == metric)]
            if line.empty:
                continue
            line = line.sort_values("index")
            ax.plot(
                line["index"].to_numpy(dtype=float) + 0.08 * (i - (len(layer_names) - 1) / 2),
                line["value"],
                color=LINE_COLORS[i % len(LINE_COLORS)],
                linestyle=LINESTYLES[CORRELATION_METRICS.index(metric)],
                marker=MARKERS[i % len(MARKERS)],
            )
    ax.axhline(0.0, color="#999999", linewidth=0.6)
    ax.set_xlabel("spatial offset")
    ax.set_ylabel("correlation")
    layers = [
        (
            f"layer {layer}",
            {"color": LINE_COLORS[i % len(LINE_COLORS)], "marker": MARKERS[i % len(MARKERS)]},
        )
        for i, layer in enumerate(layer_names)
    ]
    kinds = [
        (metric.removeprefix("corr_"), {"color": "#666666", "linestyle": LINESTYLES[k]})
        for k, metric in enumerate(CORRELATION_METRICS)
        if metric in set(table["metric"])
    ]
    legend(ax, key_handles(layers + kinds))

"""Per-layer approximation errors as grouped bars."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

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
def plot_layer_errors(
    records: Records,
    *,
    metric: str = "relative_frobenius_error",
    reference: str | None = None,
    damping: float | None = None,
    logy: bool = False,
) -> Figure:
    """Section ``"relative_error"``: ``metric`` per layer, one bar per method in each group.

    A value without a bar is marked at the axis: ``"0"`` (or ``"≤ 0"``) on a log axis
    (e.g. block-diagonal methods per layer), ``"nan"``, ``"inf"``; the legend sits below
    the axes.  Layers appear in record order (the network's order when the records come
    from ``compare``).  Repeated rows are averaged; several references or damping values
    must be narrowed down with ``reference`` / ``damping``.
    """
    caller = "plot_layer_errors"
    rows = select(
        records, "relative_error", caller, metrics=[metric], reference=reference, damping=damping
    )
    table = reduce(rows, ["layer", "method"], caller)
    layers = list(dict.fromkeys(table["layer"]))
    methods = method_order(table["method"])
    fig, axes = new_figure(width="two" if len(layers) * len(methods) > 12 else "one")
    ax = axes[0, 0]
    bar = 0.8 / len(methods)
    positions = np.arange(len(layers))
    shown: list[float] = []
    for k, method in enumerate(methods):
        own = table[table["method"] == method].set_index("layer")["value"]
        values = own.reindex(layers)
        x = positions + (k - (len(methods) - 1) / 2) * bar
        heights = values.to_numpy(dtype=float)
        shown.extend(heights)
        ax.bar(
            x,
            np.nan_to_num(shown_values(heights, log=logy)),
            width=bar,
            color=method_color(method),
            label=method,
        )
        for xi, h, layer in zip(x, heights, layers):
            # a value without a bar (a zero or negative one on a log axis, NaN, ±inf): say
            # so where the bar would start
            if layer not in own.index or (np.isfinite(h) and (h > 0 or not logy)):
                continue
            ax.text(
                xi,
                0.01,
                _unshown_label(h),
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=6,
                color=method_color(method),
            )
    ax.set_xticks(positions, layers, rotation=90 if len(layers) > 4 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric.replace("_", " "))
    if logy:
        log_scale(ax, "y", shown)
    ax.grid(axis="x", visible=False)
    refs = rows["reference"].dropna().unique()
    if len(refs) == 1:
        ax.set_title(f"vs {refs[0]}")
    legend(ax, outside=True)
    return fig


def _unshown_label(value: float) -> str:
    """The mark of a value that has no bar."""
    if np.isnan(value):
        return "nan"
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "0" if value == 0 else "≤ 0"

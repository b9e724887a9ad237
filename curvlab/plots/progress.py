"""Progress of one update step per method (e.g. relative loss decrease) as bars."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from curvlab.errors import DataError, OptionError
from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import (
    legend,
    method_color,
    method_order,
    new_figure,
    shown_values,
    styled,
)


@styled
def plot_progress(
    records: Records,
    *,
    metric: str | None = None,
    layer: str | None = None,
    reference: str | None = None,
    damping: float | None = None,
) -> Figure:
    """Section ``"progress"``: one horizontal bar per method (names never overlap),
    annotated with its value.

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
        raise OptionError(
            f"{caller}: the 'progress' records hold several metrics "
            f"({', '.join(map(repr, found))}); pass metric=... to plot one"
        )
    table = reduce(rows, ["method"], caller)
    methods = method_order(table["method"])
    values = table.set_index("method")["value"].reindex(methods).to_numpy(dtype=float)
    fig, axes = new_figure(height=0.6 + 0.22 * max(len(methods), 3))
    ax = axes[0, 0]
    positions = np.arange(len(methods))[::-1]
    bars = ax.barh(
        positions,
        np.nan_to_num(shown_values(values)),
        color=[method_color(m) for m in methods],
        height=0.7,
    )
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=6.5, padding=1.5)
    ax.axvline(0.0, color="#000000", linewidth=0.6)
    ax.margins(x=0.15)
    ax.set_yticks(positions, methods)
    ax.set_xlabel(found[0].replace("_", " "))
    ax.grid(axis="y", visible=False)
    return fig


@styled
def plot_step_progress(records: Records, *, reference: str = "kfac") -> Figure:
    """Section ``"step_progress"`` (:func:`curvlab.compare.step_progress.step_progress`):
    left, each method's relative loss decrease per checkpoint (the step index); right, its
    ratio to ``reference``'s at the same checkpoint (log scale, where both are positive),
    with the line ratio = 1.  The legend gives each method's median ratio."""
    caller = "plot_step_progress"
    rows = select(records, "step_progress", caller, metrics=["relative_loss_decrease"])
    rows = rows.dropna(subset=["index"])
    if rows.empty:
        raise DataError(f"{caller}: no 'relative_loss_decrease' record has a step (index)")
    table = reduce(rows, ["method", "index"], caller).pivot(
        index="index", columns="method", values="value"
    )
    if reference not in table:
        raise OptionError(f"{caller}: no records of the reference method '{reference}'")
    fig, axes = new_figure(1, 2, width="two", height=2.4)
    left, right = axes[0]
    methods = method_order(table.columns)
    for method in methods:
        left.plot(
            table.index, shown_values(table[method]), color=method_color(method), label=method
        )
    left.axhline(0.0, color="#000000", linewidth=0.6)
    left.set_xlabel("step")
    left.set_ylabel("relative loss decrease")
    legend(left)
    ref = table[reference]
    for method in methods:
        if method == reference:
            continue
        ok = (ref > 0) & (table[method] > 0) & np.isfinite(ref) & np.isfinite(table[method])
        ratio = table[method][ok] / ref[ok]
        median = float(np.median(ratio)) if len(ratio) else float("nan")
        right.plot(
            ratio.index,
            ratio,
            color=method_color(method),
            marker="o",
            markersize=2.5,
            linewidth=0.8,
            label=f"{method} (median {median:.3g})",
        )
    right.axhline(1.0, color="#000000", linewidth=0.6)
    right.set_yscale("log")  # the ratios are finite and positive, and 1 is drawn
    right.set_xlabel("step")
    right.set_ylabel(f"ratio to {reference}")
    legend(right)
    return fig

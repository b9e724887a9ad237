"""The eigenbasis / eigenvalue split of eigenbasis methods' errors as stacked bars."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from curvlab.plots.select import Records, reduce, select
from curvlab.plots.style import legend, method_color, method_order, new_figure, styled
from curvlab.records import NETWORK

CLIP = 1.0
"""Bars above this squared relative error (C no closer than 0 is) are cut, their height
written on top."""

PARTS = (("eigenbasis_error", "eigenbasis", None), ("eigenvalue_error", "eigenvalues", "///"))


@styled
def plot_error_split(records: Records, *, layer: str = NETWORK) -> Figure:
    """Section ``"relative_error"``: per method, the squared eigenbasis error stacked under
    the squared eigenvalue error (:mod:`curvlab.compare.eigen_split`); the bar's height is
    the squared relative Frobenius error of the (block-diagonal part of the) matrix.  Bars
    above :data:`CLIP` are cut at the top of the axes and labelled with their height.

    Args:
        records: Records with metrics ``"eigenbasis_error"`` and ``"eigenvalue_error"``.
        layer: The layer, or :data:`~curvlab.records.NETWORK`.
    """
    caller = "plot_error_split"
    rows = select(
        records,
        "relative_error",
        caller,
        metrics=[metric for metric, _, _ in PARTS],
        layer=layer,
    )
    table = reduce(rows, ["metric", "method"], caller)
    methods = method_order(table["method"])
    fig, axes = new_figure(width="two" if len(methods) > 6 else "one")
    ax = axes[0, 0]
    positions = np.arange(len(methods))
    bottom = np.zeros(len(methods))
    colors = [method_color(m) for m in methods]
    for metric, _, hatch in PARTS:
        values = table[table["metric"] == metric].set_index("method")["value"].reindex(methods)
        squared = np.nan_to_num(values.to_numpy(dtype=float) ** 2)
        ax.bar(
            positions,
            squared,
            bottom=bottom,
            color=colors,
            hatch=hatch,
            edgecolor="white" if hatch else None,
            alpha=1.0 if hatch is None else 0.55,
        )
        bottom += squared
    if (bottom > CLIP).any():  # e.g. FOOF's A ⊗ I, not meant to match F's scale
        ax.set_ylim(0, CLIP * 1.1)
        for x, total in zip(positions, bottom):
            if total > CLIP:
                ax.annotate(
                    f"{total:.3g}", (x, CLIP * 1.1), ha="center", va="top", fontsize="small"
                )
    rotate = len(methods) > 4
    ax.set_xticks(
        positions, methods, rotation=30 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.set_ylabel("squared relative error")
    ax.set_title(f"error split, {layer}" if layer != NETWORK else "error split")
    ax.grid(axis="x", visible=False)
    handles = [
        Patch(facecolor="0.45", label="eigenbasis error²"),
        Patch(
            facecolor="0.45", alpha=0.55, hatch="///", edgecolor="white", label="eigenvalue error²"
        ),
    ]
    legend(ax, handles)
    return fig

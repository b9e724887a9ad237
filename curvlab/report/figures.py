"""The figures of a comparison report, rendered from records with :mod:`curvlab.plots`.

Records of several models carry ``extra["model"]``; each model gets its own figures
(names end in ``_<model>``), plus one KFC panel across models when more than one has
conv layers (e.g. max- vs average-pooling networks).  Figure names start with their
section's name, which is how the report writer places them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from curvlab.plots import (
    plot_cosine_heatmap,
    plot_damping_sweep,
    plot_error_split,
    plot_kfc_checks,
    plot_layer_errors,
    plot_progress,
    plot_spectra,
)
from curvlab.plots.style import STYLE, fit_title, fit_titles
from curvlab.records import NETWORK, Record, to_dataframe
from curvlab.report.findings import figure_label, findings_frame, plot_findings


def _has(df: pd.DataFrame, section: str, **columns) -> bool:
    rows = df[df["section"] == section]
    for column, value in columns.items():
        rows = rows[rows[column].isin(value if isinstance(value, list) else [value])]
    return not rows.empty


def _titled(fig: Figure, model: str | None) -> Figure:
    """The model's name in front of the figure's title (else the first axes' title); every
    axes title wrapped to its axes."""
    suptitle = fig.get_suptitle()
    if model is not None and suptitle:
        fig.suptitle(f"{model}: {suptitle}", fontsize=STYLE["axes.titlesize"])
    elif model is not None and fig.axes:
        ax = fig.axes[0]
        fit_title(ax, f"{model}: {ax.get_title()}" if ax.get_title() else model)
    return fit_titles(fig)


def model_figures(df: pd.DataFrame, headline_damping: float, reference: str) -> dict[str, Figure]:
    """Figures for the records of one model (a DataFrame of :func:`to_dataframe`)."""
    figs: dict[str, Figure] = {}
    findings = findings_frame(df, headline_damping, reference)
    if not findings.empty:
        figs["findings"] = plot_findings(findings, headline_damping, reference)
    cos = df[(df["section"] == "cosine") & (df["layer"] == NETWORK)]
    for metric in dict.fromkeys(cos["metric"]):
        name = "cosine" if metric == "cosine" else f"cosine_{metric.removeprefix('cosine_')}"
        figs[name] = plot_cosine_heatmap(df, metric=metric, damping=headline_damping)
    errors = df[(df["section"] == "relative_error") & (df["method"] != "exact")]
    if _has(errors, "relative_error", metric="relative_frobenius_error"):
        figs["relative_error"] = plot_layer_errors(errors, logy=True)
    split = ["eigenbasis_error", "eigenvalue_error"]
    if _has(df, "relative_error", metric=split, layer=NETWORK):
        figs["relative_error_split"] = plot_error_split(df)
    eigen = df[(df["section"] == "spectrum") & (df["metric"] == "eigenvalue")]
    eigen = eigen[eigen["layer"] == NETWORK]["value"].to_numpy(dtype=float)
    if (np.isfinite(eigen) & (eigen > 0)).any():  # a log axis needs a positive eigenvalue
        figs["spectrum"] = plot_spectra(df, kind="rank")
        figs["spectrum_density"] = plot_spectra(df, kind="density")
    foof_refs = df.loc[(df["section"] == "damping") & (df["metric"] == "cosine_foof"), "reference"]
    sweeps = (
        ("damping_cosine", ["cosine"], reference, False),
        *(("damping_foof", ["cosine", "cosine_foof"], ref, False) for ref in foof_refs.unique()),
        ("damping_cross_terms", ["cross_terms_ratio"], None, True),
        ("damping_step_size", ["effective_step_size"], None, True),
    )
    for name, metrics, ref, logy in sweeps:
        wanted = {"metric": metrics, "layer": NETWORK}
        if ref is not None:
            wanted["reference"] = ref
        if _has(df, "damping", **wanted):
            figs[name] = plot_damping_sweep(
                df, metrics=metrics, reference=ref, logy=logy, layer=NETWORK
            )
    progress = df[(df["section"] == "progress") & (df["metric"] == "best_relative_loss_decrease")]
    for name, rows in (
        ("progress", progress[progress["reference"].isna()]),
        ("progress_rescaled", progress[progress["reference"].notna()]),
    ):
        if not rows.empty:
            fig = plot_progress(rows, damping=headline_damping)
            title = f"λ = {headline_damping:g}, best learning rate"
            if name == "progress_rescaled":
                title += f", steps rescaled to {rows['reference'].iloc[0]}'s norms"
            fig.axes[0].set_title(title)
            figs[name] = fig
    if _has(df, "kfc_check"):
        figs["kfc_check"] = plot_kfc_checks(df)
    return figs


def report_figures(
    records: Sequence[Record], headline_damping: float, reference: str = "exact"
) -> dict[str, Figure]:
    """Every figure of a report: per model, and the KFC panel across models.

    Args:
        records: The records (``extra["model"]`` tells models apart, if present).
        headline_damping: The λ shown in heatmaps and progress bars.
        reference: The reference method of the damping cosine sweep.
    """
    df = to_dataframe(records)
    if "model" not in df.columns:
        figs = model_figures(df, headline_damping, reference)
        return {name: _titled(fig, None) for name, fig in figs.items()}
    figs: dict[str, Figure] = {}
    models = list(dict.fromkeys(df["model"]))
    for model in models:
        sub = df[df["model"] == model]
        for name, fig in model_figures(sub, headline_damping, reference).items():
            figs[f"{name}_{figure_label(model)}"] = _titled(fig, model)
    kfc = df[df["section"] == "kfc_check"]
    if kfc["model"].nunique() > 1:
        kfc = kfc.assign(layer=kfc["model"] + ":" + kfc["layer"].astype(str))
        figs["kfc_check_models"] = _titled(plot_kfc_checks(kfc), None)
    return figs

"""The findings that open a comparison report: per model, one table, one figure, a few sentences.

In a report of several models (records with ``extra["model"]``) each model's findings
form a subsection ``findings_<model>`` of ``findings`` (:func:`findings_section`), headed
with the model and the data (:func:`findings_titles`): its sentences, its figure
(named like the section by :mod:`curvlab.report.figures`), its table.

The table has one row per method (the reference left out) and one column per headline
metric that the records hold (:data:`COLUMNS`): the cosine of the method's direction to
the reference direction (the exact natural gradient by default) at the headline λ, the
whole-network relative Frobenius error and matrix cosine against the exact Fisher, the
KL divergence between the damped Gaussians when it was measured, and the best one-step
progress.  Columns whose records are absent are left out, so metrics added to
``compare`` appear here once their records exist.  The sentences state which method is
closest, how the ranking changes over the λ grid, which matrix is nearest and which
step makes the most progress; every number quoted is in the table or ``results.csv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from curvlab.plots.style import STYLE, log_scale, method_color, new_figure, shown_values, styled
from curvlab.records import NETWORK, Record, to_dataframe
from curvlab.report.tables import Table, format_cell


@dataclass(frozen=True)
class Column:
    """One findings column.

    Attributes:
        key: Short name (also the figure panel's).
        label: Header; ``{lam}`` is the headline λ, ``{ref}`` the reference's description.
        short: The figure panel's title (``{ref}`` the reference's name).
        metrics: Record metrics that hold it, in order of preference (the first found is used).
        section: The records' section, or ``None`` for any.
        reference: ``"ref"``: records against the report's reference; ``"none"``: records
            without a reference; ``"any"``: the reference's if present, else any.
        damped: Taken at the headline λ (when the records carry a damping).
        higher_is_better: Which way the ranking goes.
        log: Logarithmic axis in the findings figure.
    """

    key: str
    label: str
    short: str
    metrics: tuple[str, ...]
    section: str | None
    reference: str
    damped: bool
    higher_is_better: bool
    log: bool


COLUMNS = (
    Column(
        "cosine",
        "cosine to {ref} (λ = {lam})",
        "cosine to {ref}",
        ("cosine",),
        "cosine",
        "ref",
        True,
        True,
        False,
    ),
    Column(
        "error",
        "relative Frobenius error",
        "relative Frobenius error",
        ("relative_frobenius_error",),
        None,
        "any",
        False,
        False,
        True,
    ),
    Column(
        "matrix_cosine",
        "matrix cosine",
        "matrix cosine",
        ("matrix_cosine", "frobenius_cosine"),
        None,
        "any",
        False,
        True,
        False,
    ),
    Column(
        "kl",
        "KL divergence (λ = {lam})",
        "KL divergence",
        ("kl_divergence", "kl", "logdet_divergence"),
        None,
        "any",
        True,
        False,
        True,
    ),
    Column(
        "progress",
        "best progress per update (λ = {lam})",
        "best progress per update",
        ("best_relative_loss_decrease",),
        "progress",
        "none",
        True,
        True,
        False,
    ),
)
"""The findings columns, in table order."""


def _reference_label(reference: str) -> str:
    return "the exact natural gradient" if reference == "exact" else f"{reference}'s direction"


def column_values(df: pd.DataFrame, column: Column, lam: float, reference: str) -> pd.Series:
    """The whole-network value of ``column`` per method (empty when not measured)."""
    rows = df[df["metric"].isin(column.metrics) & (df["layer"] == NETWORK)]
    if column.section is not None:
        rows = rows[rows["section"] == column.section]
    if rows.empty:
        return pd.Series(dtype=float)
    metric = next(m for m in column.metrics if (rows["metric"] == m).any())
    rows = rows[rows["metric"] == metric]
    refs = rows["reference"] if "reference" in rows.columns else pd.Series(None, index=rows.index)
    if column.reference == "ref":
        rows = rows[refs == reference]
    elif column.reference == "none":
        rows = rows[refs.isna()]
    elif (refs == reference).any():
        rows = rows[refs == reference]
    if column.damped and "damping" in rows.columns and rows["damping"].notna().any():
        rows = rows[np.isclose(rows["damping"].astype(float), lam)]
    return rows.groupby("method", sort=False)["value"].mean()


def findings_frame(df: pd.DataFrame, lam: float, reference: str) -> pd.DataFrame:
    """One model's findings: methods (rows, the reference left out) x measured columns
    (:attr:`Column.key`)."""
    values = {c.key: column_values(df, c, lam, reference) for c in COLUMNS}
    values = {k: v for k, v in values.items() if not v.empty}
    methods = [m for m in dict.fromkeys(df["method"]) if m != reference]
    frame = pd.DataFrame({k: v.reindex(methods) for k, v in values.items()}, index=methods)
    return frame.dropna(how="all")


def _models(df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    if "model" not in df.columns:
        return [(None, df)]
    return [(str(m), df[df["model"] == m]) for m in dict.fromkeys(df["model"].dropna())]


def figure_label(model: str) -> str:
    """``model`` as a figure- or section-name part: letters, digits, ``_ . -`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"


def findings_section(model: str | None) -> str:
    """The report section of ``model``'s findings (``"findings"`` for unnamed records)."""
    return "findings" if model is None else f"findings_{figure_label(model)}"


def findings_titles(records: Sequence[Record], config: Mapping[str, Any]) -> dict[str, str]:
    """The heading of each model's findings subsection: the model and the data."""
    df = to_dataframe(records)
    data = config.get("data")
    return {
        findings_section(model): f"{model} on '{data}'" if data else str(model)
        for model, _ in _models(df)
        if model is not None
    }


def findings_sections(
    records: Sequence[Record], config: Mapping[str, Any]
) -> dict[str, list[Table]]:
    """:func:`findings_tables` by report section (:func:`findings_section`); a table in
    its model's own subsection has no caption."""
    df = to_dataframe(records)
    models = [m for m, _ in _models(df)]
    out: dict[str, list[Table]] = {}
    for table in findings_tables(records, config):
        model = table.title if table.title in models else None
        if model is not None:
            table = Table(table.columns, table.rows, table.note)
        out.setdefault(findings_section(model), []).append(table)
    return out


def _label(column: Column, lam: float, reference: str) -> str:
    return column.label.format(lam=f"{lam:g}", ref=_reference_label(reference))


def findings_tables(records: Sequence[Record], config: Mapping[str, Any]) -> list[Table]:
    """One findings table per model (config: ``headline_damping``, ``reference``)."""
    df = to_dataframe(records)
    lam, ref = float(config["headline_damping"]), str(config.get("reference", "exact"))
    tables = []
    for model, sub in _models(df):
        frame = findings_frame(sub, lam, ref)
        if frame.empty:
            continue
        columns = [c for c in COLUMNS if c.key in frame.columns]
        cells = [
            [method, *(format_cell(frame.at[method, c.key]) for c in columns)]
            for method in frame.index
        ]
        header = ["method", *(_label(c, lam, ref) for c in columns)]
        note = (
            "Whole network. An empty cell: not measured for that method (methods that "
            "share a matrix, e.g. kfac-standard with kfac, have its errors once)."
        )
        tables.append(Table(header, cells, note, model))
    return tables


def _closest_per_damping(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Cosine to the reference per (damping, method), whole network."""
    rows = df[
        (df["section"] == "cosine")
        & (df["metric"] == "cosine")
        & (df["layer"] == NETWORK)
        & (df["reference"] == reference)
        & (df["method"] != reference)
    ]
    return rows.pivot_table(index="damping", columns="method", values="value", sort=False)


def _ranking_sentence(df: pd.DataFrame, reference: str) -> str | None:
    wide = _closest_per_damping(df, reference).sort_index()
    if len(wide) < 2:
        return None
    best = wide.idxmax(axis=1)
    lams = [f"{x:g}" for x in wide.index]
    runs: list[tuple[str, list[str]]] = []
    for lam, method in zip(lams, best):
        if runs and runs[-1][0] == method:
            runs[-1][1].append(lam)
        else:
            runs.append((method, [lam]))
    if len(runs) == 1:
        text = f"at every λ of the grid ({lams[0]} to {lams[-1]}), {runs[0][0]} is closest"
    else:
        parts = [
            f"{m} at λ = {ls[0]}" if len(ls) == 1 else f"{m} for λ = {ls[0]} to {ls[-1]}"
            for m, ls in runs
        ]
        text = "the closest method changes with λ: " + ", ".join(parts)
    swaps = []
    order = [list(row.sort_values(ascending=False).index) for _, row in wide.iterrows()]
    for k in range(1, len(order)):
        before, after = order[k - 1], order[k]
        for a in after:
            for b in after[after.index(a) + 1 :]:
                if b in before and a in before and before.index(b) < before.index(a):
                    swaps.append(f"{a} overtakes {b} between λ = {lams[k - 1]} and {lams[k]}")
    if swaps:
        shown = "; ".join(swaps[:3])
        more = f"; {len(swaps) - 3} more in the cosine table" if len(swaps) > 3 else ""
        text += f". The full ranking changes {len(swaps)} times ({shown}{more})"
    return text[:1].upper() + text[1:] + "."


def _model_sentences(df: pd.DataFrame, lam: float, reference: str) -> list[str]:
    frame = findings_frame(df, lam, reference)
    out = []
    if "cosine" in frame and frame["cosine"].notna().any():
        cos = frame["cosine"].dropna().sort_values(ascending=False)
        text = (
            f"At λ = {lam:g} the direction closest to {_reference_label(reference)} is "
            f"{cos.index[0]}'s (cosine {cos.iloc[0]:.3g})"
        )
        if len(cos) > 1:
            text += f", then {cos.index[1]}'s ({cos.iloc[1]:.3g})"
        if len(cos) > 2:
            text += f"; the farthest is {cos.index[-1]}'s ({cos.iloc[-1]:.3g})"
        out.append(text + ".")
    ranking = _ranking_sentence(df, reference)
    if ranking:
        out.append(ranking)
    if "error" in frame and frame["error"].notna().sum() > 1:
        err = frame["error"].dropna().sort_values()
        out.append(
            f"The curvature matrix nearest the exact Fisher is {err.index[0]}'s (relative "
            f"Frobenius error {err.iloc[0]:.3g}); the farthest is {err.index[-1]}'s "
            f"({err.iloc[-1]:.3g})."
        )
    if "kl" in frame and frame["kl"].notna().sum() > 1:
        kl = frame["kl"].dropna().sort_values()
        out.append(
            f"The smallest KL divergence at λ = {lam:g} is {kl.index[0]}'s ({kl.iloc[0]:.3g}); "
            f"the largest {kl.index[-1]}'s ({kl.iloc[-1]:.3g})."
        )
    if "progress" in frame and frame["progress"].notna().any():
        prog = frame["progress"].dropna().sort_values(ascending=False)
        text = (
            f"The largest one-step loss decrease at λ = {lam:g} comes from {prog.index[0]} "
            f"(relative decrease {prog.iloc[0]:.3g}, at its best learning rate of the grid)"
        )
        if "cosine" in frame and frame["cosine"].notna().any():
            closest = frame["cosine"].idxmax()
            if closest == prog.index[0]:
                text += ", which is also the closest direction"
            elif closest in prog.index:
                text += f"; the closest direction, {closest}'s, gets {prog[closest]:.3g}"
        out.append(text + ".")
    return out


def findings_paragraphs(records: Sequence[Record], config: Mapping[str, Any]) -> dict[str, str]:
    """The findings sentences of each model by report section (:func:`findings_section`;
    config: ``headline_damping``, ``reference``)."""
    df = to_dataframe(records)
    lam, ref = float(config["headline_damping"]), str(config.get("reference", "exact"))
    out = {}
    for model, sub in _models(df):
        sentences = _model_sentences(sub, lam, ref)
        if sentences:
            out[findings_section(model)] = " ".join(sentences)
    return out


def findings_text(records: Sequence[Record], config: Mapping[str, Any]) -> str:
    """The findings sentences, one paragraph per model led by its name in bold."""
    df = to_dataframe(records)
    paragraphs = findings_paragraphs(records, config)
    out = []
    for model, _ in _models(df):
        text = paragraphs.get(findings_section(model))
        if text:
            out.append((f"**{model}.** " if model is not None else "") + text)
    return "\n\n".join(out)


@styled
def plot_findings(frame: pd.DataFrame, lam: float, reference: str) -> Figure:
    """The findings of one model as one panel per column: a horizontal bar per method.

    Methods share the vertical axis (same order as the table); error and KL panels are
    logarithmic (when they hold a positive value); each bar is labelled with its value, a
    value without a bar (infinite, or not positive on a log axis) is written at the axis,
    a method without a value is marked "n/a".
    """
    columns = [c for c in COLUMNS if c.key in frame.columns]
    fig, axes = new_figure(1, len(columns), width="two", height=0.45 + 0.22 * max(len(frame), 3))
    positions = np.arange(len(frame))[::-1]
    for ax, column in zip(axes[0], columns):
        values = frame[column.key].to_numpy(dtype=float)
        shown = shown_values(values, log=column.log)
        bars = ax.barh(positions, shown, color=[method_color(m) for m in frame.index], height=0.7)
        missing = ~np.isfinite(shown)
        ax.bar_label(
            bars,
            labels=["" if m else f"{v:.3g}" for v, m in zip(values, missing)],
            fontsize=6,
            padding=1.5,
        )
        for y, v in zip(positions[missing], values[missing]):
            ax.text(
                0.02,
                y,
                "n/a" if np.isnan(v) else f"{v:.3g}",
                transform=ax.get_yaxis_transform(),
                fontsize=6,
                va="center",
                color="#666666",
            )
        if column.log:
            log_scale(ax, "x", shown)
        ax.margins(x=0.3)
        ax.set_yticks(positions, list(frame.index) if ax is axes[0][0] else [])
        ax.set_ylim(-0.6, len(frame) - 0.4)
        ax.set_title(column.short.format(ref="exact NG" if reference == "exact" else reference))
        ax.grid(axis="y", visible=False)
    fig.suptitle(f"whole network, λ = {lam:g}", fontsize=STYLE["axes.titlesize"])
    return fig

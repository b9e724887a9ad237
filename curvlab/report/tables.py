"""Section tables: the records of one section as short, readable tables.

A section's table shows its records without repeating what every row shares:

* columns holding one value throughout move into the table's note ("layer: network");
* one table per model when the records hold several models;
* a sweep axis (damping λ, then the record index, then the layer) with few values
  becomes the columns, so one row is one series (``λ = 0.001 | λ = 0.01 | ...``);
* series with many values (spectra) are summarised by count, min and max only where
  those differ; label columns that only describe a value (``lr``, ``num_nonzero``) are
  left to ``results.csv``.

Some sections show a selection (:data:`SELECTIONS`): the cosine table the whole-network
cosines against the reference (the heatmaps show every pair), the progress table the
best learning rate's decrease, the spectrum table one row per method.  ``results.csv``
and ``results.json`` always hold every record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from curvlab.records import NETWORK


@dataclass
class Table:
    """A table of formatted cells.

    Attributes:
        columns: Header cells.
        rows: One list of cells per row, as long as ``columns``.
        note: A line to show under the table (what it shows, what it leaves out), or ``None``.
        title: A caption above the table (e.g. the model), or ``None``.
    """

    columns: list[str]
    rows: list[list[str]]
    note: str | None = None
    title: str | None = None


def format_cell(value: object) -> str:
    """A table cell: floats with four significant digits, missing values empty."""
    try:
        missing = bool(pd.isna(value))
    except (TypeError, ValueError):
        missing = False
    if missing:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


MAX_TABLE_ROWS = 40
"""Tables are cut after this many rows (the note says so)."""

MAX_PIVOT = 12
"""A sweep axis with at most this many values becomes the table's columns."""

KEYS = ("model", "metric", "method", "reference", "layer", "damping", "index")
"""Columns that identify a series; other record columns describe a value."""

PIVOTS = ("damping", "index", "layer")
"""Sweep axes tried, in order, as the table's columns."""

METRIC_LABELS = {
    "cosine": "cosine",
    "relative_frobenius_error": "relative Frobenius error",
    "frobenius_cosine": "matrix cosine",
    "matrix_cosine": "matrix cosine",
    "kl_divergence": "KL divergence",
    "eigenbasis_error": "eigenbasis error",
    "eigenvalue_error": "eigenvalue error",
    "eigenvalue": "eigenvalue",
    "top_k_overlap": "top-k overlap",
    "cross_terms_ratio": "cross-terms ratio",
    "effective_step_size": "effective step size",
    "relative_loss_decrease": "relative loss decrease",
    "best_relative_loss_decrease": "best relative loss decrease",
    "iad": "IAD",
    "iad_sh": "IAD + SH",
    "kfc": "KFC (IAD + SH + SUD)",
    "corr_activations": "activation correlation",
    "corr_derivatives": "derivative correlation",
}
"""Readable names of known metrics; others show with ``_`` as spaces."""

_INDEX_LABELS = {"kfc_check": "offset", "spectrum": "k"}


def metric_label(metric: str) -> str:
    """The readable name of a metric."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _cosine(rows: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, str]:
    keep = rows["layer"] == NETWORK
    if reference is not None and (rows["reference"] == reference).any():
        keep &= rows["reference"] == reference
    note = "Whole network against the reference; every pair and layer: heatmaps, results.csv."
    return rows[keep], note


def _damping(rows: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, str]:
    return rows[rows["layer"] == NETWORK], "Whole network; per-layer values in results.csv."


def _progress(rows: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, str]:
    best = rows[rows["metric"] == "best_relative_loss_decrease"]
    note = (
        "At each method's best learning rate of the grid; rows with a reference rescale "
        "every step to that method's per-layer norms. Every learning rate: results.csv."
    )
    return (best if not best.empty else rows), note


def _relative_error(rows: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, str]:
    return rows[rows["method"] != rows["reference"]], "Methods that share a matrix appear once."


SELECTIONS: dict[str, Callable[[pd.DataFrame, str | None], tuple[pd.DataFrame, str]]] = {
    "cosine": _cosine,
    "relative_error": _relative_error,
    "damping": _damping,
    "progress": _progress,
}
"""Per section: ``(rows, reference) -> (rows shown, note)``."""


def section_tables(rows: pd.DataFrame, reference: str | None = None) -> list[Table]:
    """The tables of one section's records (a DataFrame of :func:`to_dataframe`).

    Args:
        rows: The section's records.
        reference: The report's reference method (the cosine table shows cosines to it).
    """
    section = str(rows["section"].iloc[0])
    rows = rows.drop(columns="section")
    note = None
    if section in SELECTIONS:
        rows, note = SELECTIONS[section](rows, reference)
    if section == "spectrum":
        return _per_model(rows, _spectrum_table, note)
    index_label = _INDEX_LABELS.get(section, "index")
    return _per_model(rows, lambda r: compact_tables(r, index_label), note)


def _per_model(
    rows: pd.DataFrame, tables: Callable[[pd.DataFrame], list[Table]], note: str | None
) -> list[Table]:
    if "model" in rows.columns and rows["model"].nunique() > 1:
        out = []
        for model in dict.fromkeys(rows["model"]):
            for table in tables(rows[rows["model"] == model].drop(columns="model")):
                out.append(_titled(table, str(model)))
    else:
        out = tables(rows)
    if note and out:
        out[-1].note = f"{out[-1].note} {note}" if out[-1].note else note
    return out


def _titled(table: Table, title: str) -> Table:
    table.title = f"{title}: {table.title}" if table.title else title
    return table


def compact_tables(rows: pd.DataFrame, index_label: str = "index") -> list[Table]:
    """``rows`` as tables without repeated columns (see the module docstring)."""
    unused = [c for c in rows.columns if c != "value" and rows[c].isna().all()]
    rows = rows.drop(columns=unused)  # the values stay, NaN or not
    if rows.empty:
        return []
    keys = [c for c in KEYS if c in rows.columns]
    for pivot in PIVOTS:
        if pivot in keys and rows[pivot].isna().any() and rows[pivot].notna().any():
            # Records with and without this axis (e.g. per-layer errors and correlations
            # over offsets): one table each.
            has = rows[pivot].notna()
            return compact_tables(rows[~has], index_label) + compact_tables(rows[has], index_label)
    constant = [c for c in keys if rows[c].nunique(dropna=False) == 1]
    shared = [f"{_header(c, index_label)}: {format_cell(rows[c].iloc[0])}" for c in constant]
    keys = [c for c in keys if c not in constant]
    values = rows[[*keys, "value"]].copy()
    if "metric" in values.columns:
        values["metric"] = values["metric"].map(metric_label)
    note = "; ".join(shared) + "." if shared else None
    for pivot in PIVOTS:
        if pivot in keys and values[pivot].nunique() <= MAX_PIVOT and _unique(values, keys):
            return [_pivot(values, keys, pivot, index_label, note)]
    if "index" not in keys and (not keys or _unique(values, keys)):
        extra = [c for c in rows.columns if c not in KEYS and c != "value"]
        values = values.join(rows[extra]) if len(values) <= MAX_TABLE_ROWS else values
        return [_table(values, index_label, note)]
    return [_summary(values, keys, index_label, note)]


def _unique(values: pd.DataFrame, keys: list[str]) -> bool:
    return not values.duplicated(keys).any()


def _header(column: str, index_label: str) -> str:
    return {"damping": "λ", "index": index_label, "reference": "against"}.get(column, column)


def _pivot(
    values: pd.DataFrame, keys: list[str], pivot: str, index_label: str, note: str | None
) -> Table:
    rest = [k for k in keys if k != pivot]
    axis = list(dict.fromkeys(values[pivot]))
    if pivot != "layer":
        axis = sorted(axis, key=float)
    found = {
        (tuple(format_cell(v) for v in row[:-2]), format_cell(row[-2])): row[-1]
        for row in values[[*rest, pivot, "value"]].itertuples(index=False)
    }
    series = values[rest].drop_duplicates() if rest else pd.DataFrame(index=[0])
    cells = []
    for row in series.itertuples(index=False):
        labels = [format_cell(v) for v in row]
        cells.append(
            labels + [format_cell(found.get((tuple(labels), format_cell(a)))) for a in axis]
        )
    header = _header(pivot, index_label)
    columns = [_header(c, index_label) for c in rest] + [
        f"{header} = {format_cell(a)}" if pivot != "layer" else _layer_header(a) for a in axis
    ]
    return _cut(Table(columns, cells, note))


def _layer_header(layer: object) -> str:
    return str(layer) if layer == NETWORK else f"layer {layer}"


def _table(values: pd.DataFrame, index_label: str, note: str | None) -> Table:
    columns = [_header(c, index_label) for c in values.columns]
    cells = [[format_cell(v) for v in row] for row in values.itertuples(index=False)]
    return _cut(Table(columns, cells, note))


def _summary(values: pd.DataFrame, keys: list[str], index_label: str, note: str | None) -> Table:
    series = [k for k in keys if k != "index"]
    if "index" in values.columns:
        values = values.sort_values("index", kind="stable")
    groups = values.groupby(series, dropna=False, sort=False)["value"]
    summary = groups.agg(["count", "min", "max"]).reset_index()
    summary = summary.rename(columns={"count": "values"})
    if np.allclose(summary["min"], summary["max"], equal_nan=True):
        summary = summary.drop(columns=["min"]).rename(columns={"max": "value"})
    if summary["values"].nunique() == 1:
        shared = f"{summary['values'].iloc[0]} values per row"
        note = f"{note} {shared}." if note else f"{shared}."
        summary = summary.drop(columns="values")
    counted = f"Summary of {len(values)} records."
    return _table(summary, index_label, f"{note} {counted}" if note else counted)


def _cut(table: Table) -> Table:
    if len(table.rows) > MAX_TABLE_ROWS:
        shown = f"First {MAX_TABLE_ROWS} of {len(table.rows)} rows; every value is in results.csv."
        table.rows = table.rows[:MAX_TABLE_ROWS]
        table.note = f"{table.note} {shown}" if table.note else shown
    return table


def _spectrum_table(rows: pd.DataFrame) -> list[Table]:
    """One row per method: largest eigenvalue, eigenvalues kept / non-zero, smallest kept,
    and the top-k overlap at the largest k (whole network)."""
    rows = rows[rows["layer"] == NETWORK] if "layer" in rows.columns else rows
    eig = rows[rows["metric"] == "eigenvalue"]
    overlap = rows[rows["metric"] == "top_k_overlap"]
    other = rows[~rows["metric"].isin(["eigenvalue", "top_k_overlap"])]
    methods = list(dict.fromkeys(rows["method"]))
    columns = ["method", "largest eigenvalue", "smallest shown", "eigenvalues shown"]
    has_total = "num_nonzero" in eig.columns and eig["num_nonzero"].notna().any()
    if has_total:
        columns.append("non-zero")
    k = int(overlap["index"].max()) if not overlap.empty else None
    if k is not None:
        columns.append(f"top-{k} overlap")
    cells = []
    for method in methods:
        e = eig[eig["method"] == method]["value"]
        row = [method, format_cell(e.max()), format_cell(e.min()), str(len(e))]
        if has_total:
            total = eig[eig["method"] == method]["num_nonzero"].max()
            row.append(format_cell(total))
        if k is not None:
            at_k = overlap[(overlap["method"] == method) & (overlap["index"] == k)]["value"]
            row.append(format_cell(at_k.iloc[0]) if len(at_k) else "")
        cells.append(row)
    tables = [Table(columns, cells, "Whole network; every eigenvalue in results.csv.")]
    return tables + (compact_tables(other) if not other.empty else [])

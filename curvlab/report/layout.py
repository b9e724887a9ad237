"""What a report shows, independent of its format: sections, their narrative, figures and tables.

Sections follow the records' sections in order of first appearance.  A figure
belongs to section ``s`` when its name is ``s`` or starts with ``s_`` / ``s-``;
other figures get a section of their own.  Narrative entries attach to the
section of the same name; entries naming no section (e.g. ``"summary"``) open
the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from curvlab.records import Record, to_dataframe

MAX_TABLE_ROWS = 40
"""Sections with more records are summarised (count, min, mean, max, last) per series."""

_ORDER = ("method", "reference", "layer", "damping", "metric", "index", "value")
_FIXED = {"section", *_ORDER}


@dataclass
class Table:
    """A table of formatted cells.

    Attributes:
        columns: Header cells.
        rows: One list of cells per row, as long as ``columns``.
        note: A line to show under the table (e.g. that it is a summary), or ``None``.
    """

    columns: list[str]
    rows: list[list[str]]
    note: str | None = None


@dataclass
class Section:
    """One report section: a heading with optional narrative, figures and table."""

    name: str
    narrative: str | None = None
    figures: list[str] = field(default_factory=list)
    table: Table | None = None


def layout(
    records: Sequence[Record],
    figure_names: Sequence[str],
    narrative: Mapping[str, str],
) -> list[Section]:
    """The report's sections, in reading order (see the module docstring)."""
    record_sections = list(dict.fromkeys(r.section for r in records))
    owner = {name: _owner(name, record_sections) for name in figure_names}
    names = record_sections + [s for s in dict.fromkeys(owner.values()) if s not in record_sections]
    intro = [key for key in narrative if key not in names]
    frame = to_dataframe(records)
    sections = []
    for name in intro + names:
        rows = frame[frame["section"] == name] if name in record_sections else None
        sections.append(
            Section(
                name=name,
                narrative=narrative.get(name),
                figures=[f for f, s in owner.items() if s == name],
                table=None if rows is None else section_table(rows),
            )
        )
    return sections


def _owner(figure: str, sections: Sequence[str]) -> str:
    for section in sections:
        if figure == section or figure.startswith((f"{section}_", f"{section}-")):
            return section
    return figure


def section_table(rows: pd.DataFrame) -> Table:
    """The records of one section as a table; summarised per series above
    :data:`MAX_TABLE_ROWS` rows.  Columns that are empty throughout are left out."""
    rows = rows.drop(columns="section").dropna(axis="columns", how="all")
    extra = [c for c in rows.columns if c not in _FIXED]
    columns = [c for c in _ORDER if c in rows.columns] + extra
    if len(rows) <= MAX_TABLE_ROWS:
        cells = [[format_cell(v) for v in row] for row in rows[columns].itertuples(index=False)]
        return Table(columns, cells)
    keys = [c for c in columns if c not in ("index", "value")]
    if "index" in rows.columns:
        rows = rows.sort_values("index", kind="stable")
    groups = rows.groupby(keys, dropna=False, sort=False)["value"]
    summary = groups.agg(["count", "min", "mean", "max", "last"]).reset_index()
    summary = summary.rename(columns={"count": "n", "last": "last (highest index)"})
    if "index" not in rows.columns:
        summary = summary.drop(columns="last (highest index)")
    note = f"Summary of {len(rows)} records; every value is in results.csv."
    if len(summary) > MAX_TABLE_ROWS:
        note = f"First {MAX_TABLE_ROWS} of {len(summary)} series. " + note
        summary = summary.head(MAX_TABLE_ROWS)
    cells = [[format_cell(v) for v in row] for row in summary.itertuples(index=False)]
    return Table(list(summary.columns), cells, note)


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

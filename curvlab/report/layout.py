"""What a report shows, independent of its format: sections, their narrative, figures and tables.

Sections follow in this order: narrative entries that name no record section (e.g.
``"summary"``, ``"findings"``) open the report, then the records' sections in order of
first appearance.  A lead section named after another one plus ``_...`` (e.g.
``"findings_mlp"`` after ``"findings"``) is its subsection (``level`` 3).  A figure
belongs to section ``s`` when its name is ``s`` or starts with ``s_`` / ``s-`` (the
longest such section name wins); other figures get a section of their own.  Sections
carry readable titles (``titles`` given to :func:`layout`, else :data:`TITLES`; unknown
names show with ``_`` as spaces); ``"summary"`` has none and opens the page as a
paragraph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from curvlab.records import Record, to_dataframe
from curvlab.report.tables import Table, section_tables

TITLES = {
    "summary": None,
    "findings": "Findings",
    "cosine": "Update directions: cosine similarity",
    "relative_error": "Matrix error against the exact Fisher",
    "spectrum": "Spectra and top-k eigenspaces",
    "damping": "Effects of the damping λ",
    "progress": "Progress per update",
    "kfc_check": "KFC assumption checks (conv layers)",
    "train": "Training curves",
    "trajectory": "Diagnostics along the trajectory",
}
"""Section heading per section name (``None``: no heading)."""


def section_title(name: str) -> str | None:
    """The heading of section ``name``."""
    if name in TITLES:
        return TITLES[name]
    text = name.replace("_", " ").replace("-", " ")
    return text[:1].upper() + text[1:]


@dataclass
class Section:
    """One report section: a heading with optional narrative, figures and tables."""

    name: str
    title: str | None = None
    narrative: str | None = None
    figures: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    level: int = 2


def layout(
    records: Sequence[Record],
    figure_names: Sequence[str],
    narrative: Mapping[str, str],
    tables: Mapping[str, Sequence[Table]] | None = None,
    reference: str | None = None,
    titles: Mapping[str, str] | None = None,
) -> list[Section]:
    """The report's sections, in reading order (see the module docstring).

    Args:
        records: The report's records.
        figure_names: The figures' names.
        narrative: Text per section name.
        tables: Tables per section name, shown instead of the tables made from the
            records (e.g. the findings).
        reference: The report's reference method (see
            :func:`~curvlab.report.tables.section_tables`).
        titles: Headings per section name, in place of :func:`section_title`.
    """
    tables = dict(tables or {})
    titles = dict(titles or {})
    record_sections = list(dict.fromkeys(r.section for r in records))
    lead = list(dict.fromkeys(k for k in [*narrative, *tables] if k not in record_sections))
    nested = {k for k in lead if any(k.startswith(f"{o}_") for o in lead if o != k)}
    known = list(dict.fromkeys(lead + record_sections))
    owner = {name: _owner(name, known) for name in figure_names}
    names = known + [s for s in dict.fromkeys(owner.values()) if s not in known]
    frame = to_dataframe(records)
    sections = []
    for name in names:
        if name in tables:
            shown = list(tables[name])
        elif name in record_sections:
            shown = section_tables(frame[frame["section"] == name], reference)
        else:
            shown = []
        sections.append(
            Section(
                name=name,
                title=titles[name] if name in titles else section_title(name),
                narrative=narrative.get(name),
                figures=[f for f, s in owner.items() if s == name],
                tables=shown,
                level=3 if name in nested else 2,
            )
        )
    return sections


def _owner(figure: str, sections: Sequence[str]) -> str:
    matches = [s for s in sections if figure == s or figure.startswith((f"{s}_", f"{s}-"))]
    return max(matches, key=len) if matches else figure

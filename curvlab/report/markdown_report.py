"""``report.md``: the report as Markdown, figures linked from ``figures/``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from curvlab.report.layout import Section, Table

_INLINE = ("png", "svg", "jpg", "jpeg", "gif", "webp")


def render_markdown(
    title: str,
    facts: Sequence[tuple[str, str]],
    config_json: str,
    sections: Sequence[Section],
    figure_files: Mapping[str, Sequence[str]],
) -> str:
    """The Markdown document: the sections, then the configuration and versions.

    Args:
        title: The top heading.
        facts: ``(label, value)`` pairs (date, device, versions), listed at the end.
        config_json: The run configuration as JSON text, at the end.
        sections: The report's sections (see :func:`~curvlab.report.layout.layout`).
        figure_files: Per figure name, its files relative to the report folder.
    """
    lines = [f"# {title}", ""]
    for section in sections:
        if section.title is not None:
            lines += [f"{'#' * section.level} {section.title}", ""]
        if section.narrative:
            lines += [section.narrative.strip(), ""]
        for name in section.figures:
            lines += [_figure(name, figure_files[name]), ""]
        for table in section.tables:
            lines += _table(table) + [""]
    lines += ["## Configuration and versions", ""]
    lines += [f"- **{label}**: {value}" for label, value in facts]
    lines += ["", "```json", config_json, "```", ""]
    return "\n".join(lines)


def _figure(name: str, files: Sequence[str]) -> str:
    inline = next((f for f in files if f.rsplit(".", 1)[-1] in _INLINE), None)
    links = " · ".join(f"[{f.rsplit('.', 1)[-1]}]({f})" for f in files)
    if inline is None:
        return f"**{name}**: {links}"
    return f"![{name}]({inline})\n\n*{name}*: {links}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(table: Table) -> list[str]:
    lines = [f"**{_cell(table.title)}**", ""] if table.title else []
    lines += [
        "| " + " | ".join(map(_cell, table.columns)) + " |",
        "|" + "|".join(" --- " for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"*{table.note}*"]
    return lines

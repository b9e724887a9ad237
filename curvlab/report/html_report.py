"""``report.html``: one self-contained page, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from curvlab.report.layout import Section, Table

_CSS = """
body { font-family: "DejaVu Serif", "STIX Two Text", Georgia, serif; max-width: 60rem;
       margin: 2rem auto; padding: 0 1rem; color: #111; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05rem; margin-top: 1.6rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
td:first-child { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85rem; color: #444; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
.note { font-size: 0.85rem; color: #555; font-style: italic; }
.table-title { margin: 1rem 0 0.2rem; }
details { margin: 2rem 0; } summary { cursor: pointer; font-weight: bold; }
"""


def render_html(
    title: str,
    facts: Sequence[tuple[str, str]],
    config_json: str,
    sections: Sequence[Section],
    figure_png: Mapping[str, bytes],
) -> str:
    """The HTML page; needs no other file.

    Args:
        title: Page title and top heading.
        facts: ``(label, value)`` pairs, listed at the end in a collapsed block.
        config_json: The run configuration as JSON text, in the same block.
        sections: The report's sections (see :func:`~curvlab.report.layout.layout`).
        figure_png: Per figure name, the PNG bytes to embed.
    """
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for section in sections:
        parts.append(f'<section id="{e(section.name)}">')
        if section.title is not None:
            parts.append(f"<h{section.level}>{e(section.title)}</h{section.level}>")
        if section.narrative:
            parts += [_paragraph(p) for p in section.narrative.split("\n\n") if p.strip()]
        for name in section.figures:
            data = base64.b64encode(figure_png[name]).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(name)}">'
                f"<figcaption>{e(name)}</figcaption></figure>"
            )
        parts += [_table(table) for table in section.tables]
        parts.append("</section>")
    parts += [
        '<details id="configuration"><summary>Configuration and versions</summary>',
        "<ul>" + "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts) + "</ul>",
        f"<pre>{e(config_json)}</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _paragraph(text: str) -> str:
    """A paragraph; Markdown ``**bold**`` spans become ``<b>``, lines starting ``- `` a list."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if lines and all(line.startswith("- ") for line in lines):
        items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
        return f"<ul>{items}</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


def _inline(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if k % 2 else p for k, p in enumerate(parts))


def _table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{e(table.note)}</p>' if table.note else ""
    title = f'<p class="table-title"><b>{e(table.title)}</b></p>' if table.title else ""
    return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _td(cell: str) -> str:
    try:
        float(cell)
    except ValueError:
        return f"<td>{html.escape(cell)}</td>"
    return f'<td class="num">{html.escape(cell)}</td>'

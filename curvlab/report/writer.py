"""Writing a report folder: report.md, report.html, results.json, results.csv, figures/.

Everything is rendered in memory first, then written into a hidden staging
folder inside the report folder, then each file is moved into place with
:func:`os.replace` (``results.json`` last).  A failure while rendering or
staging leaves an earlier report untouched; every file in the folder is always
either the old or the new version in full.  Only files this writer creates are
ever removed: the staging folder, and, when overwriting with ``force``, figure
files the previous report listed in its ``results.json`` that the new one no
longer writes.  Unrelated files in the folder stay.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from curvlab.errors import OptionError
from curvlab.plots.style import figure_bytes
from curvlab.records import Record
from curvlab.report.html_report import render_html
from curvlab.report.layout import layout
from curvlab.report.markdown_report import render_markdown
from curvlab.report.results import read_payload, records_csv, results_payload, to_json
from curvlab.report.tables import Table

REPORT_MARKERS = ("results.json", "report.md")
"""Files whose presence means a folder already holds a report."""

FIGURES_DIR = "figures"

_FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def write_report(
    out_dir: str | os.PathLike,
    records: Iterable[Record],
    config: Mapping[str, Any],
    figures: Mapping[str, Figure] | None = None,
    narrative: Mapping[str, str] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    force: bool = False,
    tables: Mapping[str, Sequence[Table]] | None = None,
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Write a report of ``records`` into ``out_dir`` (created if missing).

    Args:
        out_dir: The report folder.
        records: The results to report, grouped into sections by ``Record.section``.
        config: The run configuration (JSON-ready where possible); its ``"seed"`` and
            ``"device"`` entries are also stored at the top of ``results.json``.
        figures: Figures by name (letters, digits, ``_ . -``); saved as
            ``figures/<name>.<fmt>`` and shown in the section whose name the figure's
            name equals or starts with (``"cosine"``, ``"cosine_kfac"``).
        narrative: Text per section name; other keys (e.g. ``"summary"``) open the report.
        formats: Figure file formats.
        force: Overwrite a report already in ``out_dir``.
        tables: Tables per section name, shown instead of the ones made from the records
            (a name that is no record section, e.g. ``"findings"``, opens the report).
        titles: Headings per section name (default: :func:`~curvlab.report.layout.
            section_title`), e.g. of the findings of each model.

    Returns:
        The report folder.

    Raises:
        FileExistsError: ``out_dir`` already holds a report and ``force`` is false.
        ValueError: a bad figure name or format.
        TypeError: a record that is not a :class:`Record` or a figure that is not a Figure.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; choose another --out")
    existing = [name for name in REPORT_MARKERS if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{out} already holds a curvlab report ({existing[0]}); pass --force to "
            "overwrite it or choose another --out"
        )
    records = list(records)
    figures = dict(figures or {})
    narrative = dict(narrative or {})
    formats = list(dict.fromkeys(formats))
    _check_inputs(records, figures, formats)
    files = _render(
        records, config, figures, narrative, formats, dict(tables or {}), dict(titles or {})
    )
    previous = _previous_files(out) if existing else []
    _commit(out, files)
    _remove_stale(out, previous, set(files))
    return out


def _check_inputs(records: list[Record], figures: dict[str, Figure], formats: list[str]) -> None:
    wrong = next((r for r in records if not isinstance(r, Record)), None)
    if wrong is not None:
        raise TypeError(f"records must be curvlab Record objects, got {type(wrong).__name__}")
    for name, fig in figures.items():
        if not _FIGURE_NAME.fullmatch(name):
            raise OptionError(
                f"figure name {name!r} must start with a letter or digit and hold only "
                "letters, digits, '_', '.' and '-'"
            )
        if not isinstance(fig, Figure):
            raise TypeError(f"figure {name!r} is a {type(fig).__name__}, not a matplotlib Figure")
    supported = FigureCanvasAgg.get_supported_filetypes()
    unknown = [fmt for fmt in formats if fmt not in supported]
    if unknown:
        raise OptionError(
            f"unknown figure format {unknown[0]!r}; choose from {', '.join(supported)}"
        )


def _render(
    records: list[Record],
    config: Mapping[str, Any],
    figures: dict[str, Figure],
    narrative: dict[str, str],
    formats: list[str],
    tables: dict[str, Sequence[Table]],
    titles: dict[str, str],
) -> dict[str, bytes]:
    """Every file of the report, by path relative to the report folder, in commit order."""
    files: dict[str, bytes] = {}
    figure_files: dict[str, list[str]] = {}
    figure_png: dict[str, bytes] = {}
    for name, fig in figures.items():
        figure_files[name] = []
        for fmt in formats:
            rel = f"{FIGURES_DIR}/{name}.{fmt}"
            files[rel] = figure_bytes(fig, fmt)
            figure_files[name].append(rel)
        figure_png[name] = files.get(f"{FIGURES_DIR}/{name}.png") or figure_bytes(fig, "png")
    written = [*files, "results.csv", "report.html", "report.md", "results.json"]
    payload = results_payload(config, records, written)
    versions = payload["environment"]["packages"]
    facts = [
        ("created", payload["timestamp"]),
        ("device", str(payload["device"] if payload["device"] is not None else "not recorded")),
        ("seed", str(payload["seed"] if payload["seed"] is not None else "not recorded")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("records", f"{len(records)} (all values in results.csv / results.json)"),
    ]
    config_json = to_json(payload["config"]).rstrip("\n")
    reference = config.get("reference")
    sections = layout(records, list(figures), narrative, tables, reference, titles)
    title = "curvlab report"
    files["results.csv"] = records_csv(records).encode("utf-8")
    files["report.html"] = render_html(title, facts, config_json, sections, figure_png).encode(
        "utf-8"
    )
    files["report.md"] = render_markdown(title, facts, config_json, sections, figure_files).encode(
        "utf-8"
    )
    files["results.json"] = to_json(payload).encode("utf-8")
    return files


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _commit(out: Path, files: dict[str, bytes]) -> None:
    """Stage ``files`` in a hidden folder inside ``out``, then move each into place."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".curvlab-report-", dir=out))
    try:
        for rel, data in files.items():
            _write_synced(staging / rel, data)
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, out / rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _previous_files(out: Path) -> list[str]:
    """The files an earlier report in ``out`` says it wrote (none if it cannot be read)."""
    try:
        listed = read_payload(out / "results.json").get("files", [])
    except (OSError, ValueError):
        return []
    return [f for f in listed if isinstance(f, str)]


def _remove_stale(out: Path, previous: list[str], current: set[str]) -> None:
    """Remove figure files of the previous report that the new one does not write."""
    for rel in previous:
        folder, _, name = rel.partition("/")
        if rel in current or folder != FIGURES_DIR or not _FIGURE_NAME.fullmatch(name):
            continue
        path = out / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()

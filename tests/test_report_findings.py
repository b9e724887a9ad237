"""The findings that open a report, and the compact section tables, from synthetic records."""

from __future__ import annotations

import pandas as pd
import pytest

from curvlab.records import Record, to_dataframe
from curvlab.report.figures import report_figures
from curvlab.report.findings import (
    findings_frame,
    findings_sections,
    findings_tables,
    findings_text,
    findings_titles,
    plot_findings,
)
from curvlab.report.layout import layout
from curvlab.report.markdown_report import render_markdown
from curvlab.report.narrative import narrative
from curvlab.report.tables import compact_tables, section_tables

LAMS = (1e-3, 1e-2, 1e-1)
CONFIG = {"headline_damping": 1e-2, "reference": "exact"}

# cosine to exact per λ: kfac is closest at small λ, ekfac from λ = 0.01 on; sgd last
COSINES = {
    "kfac": (0.9, 0.8, 0.85),
    "ekfac": (0.7, 0.95, 0.97),
    "sgd": (0.2, 0.3, 0.4),
}


def records(model: str | None = None, kl: bool = False) -> list[Record]:
    extra = {} if model is None else {"model": model}
    out = []
    for method, values in COSINES.items():
        for lam, value in zip(LAMS, values):
            out.append(
                Record("cosine", "cosine", method, value, "network", "exact", lam, None, extra)
            )
            out.append(
                Record("cosine", "cosine", method, value / 2, "0", "exact", lam, None, extra)
            )
            out.append(
                Record("cosine", "cosine", "exact", value, "network", method, lam, None, extra)
            )
            decrease = {"kfac": 0.3, "ekfac": 0.2, "sgd": 0.1}[method] * lam * 100
            out.append(
                Record(
                    "progress",
                    "best_relative_loss_decrease",
                    method,
                    decrease,
                    damping=lam,
                    extra={**extra, "lr": 0.1},
                )
            )
    for method, error in (("kfac", 0.5), ("ekfac", 0.4)):
        out.append(
            Record(
                "relative_error",
                "relative_frobenius_error",
                method,
                error,
                "network",
                "exact",
                extra=extra,
            )
        )
        out.append(
            Record(
                "relative_error",
                "frobenius_cosine",
                method,
                1 - error,
                "network",
                "exact",
                extra=extra,
            )
        )
        if kl:
            for lam in LAMS:
                out.append(
                    Record(
                        "divergence",
                        "kl_divergence",
                        method,
                        error * lam,
                        "network",
                        "exact",
                        lam,
                        None,
                        extra,
                    )
                )
    return out


def test_findings_table_holds_the_headline_values():
    frame = findings_frame(to_dataframe(records()), 1e-2, "exact")
    assert list(frame.index) == ["kfac", "ekfac", "sgd"]  # the reference is no row
    assert list(frame.columns) == ["cosine", "error", "matrix_cosine", "progress"]
    assert frame.at["ekfac", "cosine"] == 0.95  # network, λ = 0.01, against exact
    assert frame.at["kfac", "error"] == 0.5 and frame.at["ekfac", "matrix_cosine"] == 0.6
    assert frame.at["kfac", "progress"] == pytest.approx(0.3)
    assert pd.isna(frame.at["sgd", "error"])


def test_kl_column_appears_when_its_records_exist():
    (without,) = findings_tables(records(), CONFIG)
    (with_kl,) = findings_tables(records(kl=True), CONFIG)
    assert not any("KL" in c for c in without.columns)
    assert "KL divergence (λ = 0.01)" in with_kl.columns
    column = with_kl.columns.index("KL divergence (λ = 0.01)")
    assert [row[column] for row in with_kl.rows] == ["0.005", "0.004", ""]
    assert "smallest KL divergence at λ = 0.01 is ekfac's (0.004)" in findings_text(
        records(kl=True), CONFIG
    )


def test_sentences_name_the_closest_method_and_where_the_ranking_changes():
    text = findings_text(records(), CONFIG)
    assert (
        "closest to the exact natural gradient is ekfac's (cosine 0.95), then kfac's (0.8)" in text
    )
    assert "the farthest is sgd's (0.3)" in text
    assert "The closest method changes with λ: kfac at λ = 0.001, ekfac for λ = 0.01 to 0.1" in text
    assert "ekfac overtakes kfac between λ = 0.001 and 0.01" in text
    assert "nearest the exact Fisher is ekfac's (relative Frobenius error 0.4)" in text
    assert "largest one-step loss decrease at λ = 0.01 comes from kfac" in text
    assert "the closest direction, ekfac's, gets 0.2" in text


def test_one_table_and_paragraph_per_model():
    both = records("mlp") + records("cnn")
    tables = findings_tables(both, CONFIG)
    assert [t.title for t in tables] == ["mlp", "cnn"]
    text = findings_text(both, CONFIG)
    assert text.index("**mlp.**") < text.index("**cnn.**")


def test_findings_figure_has_a_panel_per_column():
    frame = findings_frame(to_dataframe(records(kl=True)), 1e-2, "exact")
    fig = plot_findings(frame, 1e-2, "exact")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "cosine to exact NG",
        "relative Frobenius error",
        "matrix cosine",
        "KL divergence",
        "best progress per update",
    ]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["kfac", "ekfac", "sgd"]
    assert fig.axes[1].get_xscale() == "log"


def test_findings_open_the_report_layout():
    sections = layout(
        records(),
        ["findings", "cosine"],
        {"findings": findings_text(records(), CONFIG)},
        {"findings": findings_tables(records(), CONFIG)},
        "exact",
    )
    assert [s.name for s in sections] == ["findings", "cosine", "progress", "relative_error"]
    assert sections[0].title == "Findings" and sections[0].figures == ["findings"]
    assert sections[1].title == "Update directions: cosine similarity"


def test_findings_are_grouped_per_model():
    """Several models: the summary, then one subsection per model headed by the model and
    the data, holding that model's sentences, figure and table, before the sections."""
    both = records("mlp") + records("cnn max")
    config = {**CONFIG, "models": ["mlp", "cnn max"], "data": "digits", "methods": ["kfac"]}
    figures = report_figures(both, 1e-2, "exact")
    sections = layout(
        both,
        list(figures),
        narrative(both, config),
        findings_sections(both, config),
        "exact",
        findings_titles(both, config),
    )
    names = [s.name for s in sections]
    assert names[:3] == ["findings", "findings_mlp", "findings_cnn-max"]
    top, mlp, cnn = sections[:3]
    assert (top.title, top.level, top.figures, top.tables) == ("Findings", 2, [], [])
    assert "curvlab compared kfac" in top.narrative and "**mlp.**" not in top.narrative
    assert (mlp.title, mlp.level, cnn.title, cnn.level) == (
        "mlp on 'digits'",
        3,
        "cnn max on 'digits'",
        3,
    )
    assert mlp.figures == ["findings_mlp"] and cnn.figures == ["findings_cnn-max"]
    assert mlp.narrative.startswith("At λ = 0.01 the direction closest")
    assert len(mlp.tables) == 1 and mlp.tables[0].title is None
    assert all(s.level == 2 for s in sections[3:])
    text = render_markdown("r", [], "{}", sections, {f: [f"{f}.png"] for f in figures})
    assert text.index("## Findings") < text.index("### mlp on 'digits'")
    assert text.index("![findings_mlp]") < text.index("### cnn max on 'digits'")


def test_one_model_findings_heading_names_model_and_data():
    one = records("mlp")
    config = {**CONFIG, "models": ["mlp"], "data": "mnist-5k"}
    assert findings_titles(one, config) == {"findings_mlp": "mlp on 'mnist-5k'"}
    assert list(findings_sections(one, config)) == ["findings_mlp"]


def test_tables_move_shared_columns_into_the_note_and_sweeps_into_columns():
    df = to_dataframe(records())
    (table,) = section_tables(df[df["section"] == "cosine"], "exact")
    # network rows against the reference only; λ as columns; no n/min/mean/max
    assert table.columns == ["method", "λ = 0.001", "λ = 0.01", "λ = 0.1"]
    assert table.rows[0] == ["kfac", "0.9", "0.8", "0.85"]
    assert "layer: network" in table.note and "against: exact" in table.note
    (progress,) = section_tables(df[df["section"] == "progress"], "exact")
    assert "lr" not in progress.columns and len(progress.rows) == 3


def test_long_series_are_summarised_without_repeated_columns():
    rows = to_dataframe(
        [
            Record("spectrum", "eigenvalue", m, 1.0 / (k + 1), index=k)
            for m in "ab"
            for k in range(50)
        ]
    ).drop(columns="section")
    (table,) = compact_tables(rows)
    assert table.columns == ["method", "min", "max"]
    assert table.rows == [["a", "0.02", "1"], ["b", "0.02", "1"]]
    assert "50 values per row" in table.note

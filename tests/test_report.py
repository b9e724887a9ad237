"""The report writer: files, round trip, refusal to overwrite, atomicity."""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

import curvlab.report.writer as writer
from curvlab.records import Record
from curvlab.report import load_results, write_report
from curvlab.report.tables import MAX_TABLE_ROWS

CONFIG = {"model": "mlp", "dataset": "digits", "seed": 3, "device": "cpu", "dampings": [1e-3]}


def make_records() -> list[Record]:
    records = [
        Record("cosine", "cosine", "kfac", 0.93, reference="exact", damping=1e-3),
        Record("cosine", "cosine", "foof", 0.71, reference="exact", damping=1e-3),
        Record(
            "relative_error",
            "relative_frobenius_error",
            "kfac",
            0.2,
            layer="0",
            reference="exact",
            extra={"seed": 3, "note": "a|b"},
        ),
    ]
    records += [
        Record("spectrum", "eigenvalue", "exact", 1.0 / (k + 1), index=k)
        for k in range(MAX_TABLE_ROWS + 5)
    ]
    return records


def make_figure() -> Figure:
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def snapshot(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_writes_every_file(tmp_path):
    out = tmp_path / "report"
    figures = {"cosine": make_figure(), "extra-figure": make_figure()}
    narrative = {"summary": "KFAC tracks the exact direction.", "cosine": "Cosines <high>."}
    assert write_report(out, make_records(), CONFIG, figures, narrative) == out
    names = set(snapshot(out))
    assert {"report.md", "report.html", "results.json", "results.csv"} <= names
    for name in ("cosine", "extra-figure"):
        for fmt in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{fmt}").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,iVBOR') == 2
    assert "Cosines &lt;high&gt;." in html and "KFAC tracks" in html
    assert "figures/" not in html

    md = (out / "report.md").read_text()
    assert "![cosine](figures/cosine.png)" in md
    assert md.index("KFAC tracks") < md.index("## Update directions") < md.index("## Extra figure")
    assert md.index("## Extra figure") < md.index("## Configuration and versions")
    assert "a\\|b" in md
    assert "| exact | 1 | 0.02222 | 45 |" in md  # a spectrum: one row per method

    payload = json.loads((out / "results.json").read_text())
    assert payload["seed"] == 3 and payload["device"] == "cpu"
    assert payload["config"] == CONFIG
    assert {"torch", "numpy", "scipy", "curvlab"} <= set(payload["environment"]["packages"])
    assert "T" in payload["timestamp"]
    assert set(payload["files"]) == names

    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].startswith("section,metric,method,value") and len(csv) == 1 + len(make_records())


def test_round_trip(tmp_path):
    records = make_records()
    write_report(tmp_path, records, CONFIG)
    config, loaded = load_results(tmp_path)
    assert config == CONFIG
    assert loaded == records


def test_non_json_config_values_are_written(tmp_path):
    import numpy as np
    import torch

    config = {"root": tmp_path, "dtype": torch.float64, "lam": np.float32(0.5), "tags": {"b"}}
    write_report(tmp_path / "r", [], config)
    loaded, records = load_results(tmp_path / "r")
    assert loaded == {"root": str(tmp_path), "dtype": "torch.float64", "lam": 0.5, "tags": ["b"]}
    assert records == []


def test_refuses_to_overwrite_without_force(tmp_path):
    write_report(tmp_path, make_records(), CONFIG)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"{tmp_path}.*--force.*--out"):
        write_report(tmp_path, make_records()[:1], CONFIG)
    assert snapshot(tmp_path) == before


def test_force_overwrites_and_keeps_user_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "own.png").write_bytes(b"user")
    write_report(tmp_path, make_records(), CONFIG, {"old": make_figure()})
    write_report(tmp_path, make_records()[:1], {"seed": 1}, {"new": make_figure()}, force=True)
    config, records = load_results(tmp_path)
    assert config == {"seed": 1} and records == make_records()[:1]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "figures" / "own.png").read_bytes() == b"user"
    assert (tmp_path / "figures" / "new.png").is_file()
    assert not (tmp_path / "figures" / "old.png").exists()


def test_failure_mid_write_keeps_old_report(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    write_report(tmp_path, make_records(), CONFIG, {"cosine": make_figure()})
    before = snapshot(tmp_path)
    real_write = writer._write_synced
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 3:
            real_write(path, data[: len(data) // 2])
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(writer, "_write_synced", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_report(
            tmp_path, make_records()[:2], {"seed": 9}, {"cosine": make_figure()}, force=True
        )
    assert len(calls) == 3
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_while_rendering_keeps_old_report(tmp_path, monkeypatch):
    write_report(tmp_path, make_records(), CONFIG)
    before = snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(writer, "render_markdown", broken)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(tmp_path, [], {}, force=True)
    assert snapshot(tmp_path) == before


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="figure name"):
        write_report(tmp_path / "a", [], {}, {"../escape": make_figure()})
    with pytest.raises(ValueError, match="format"):
        write_report(tmp_path / "b", [], {}, {"f": make_figure()}, formats=("png", "bmpx"))
    with pytest.raises(TypeError, match="Record"):
        write_report(tmp_path / "c", [{"section": "x"}], {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a curvlab results file"):
        load_results(tmp_path)

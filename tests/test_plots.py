"""Plotting functions render synthetic records into non-empty files, in a fixed style."""

from __future__ import annotations

import math

import matplotlib as mpl
import pytest
from matplotlib.figure import Figure

from curvlab.plots import (
    METHOD_COLORS,
    method_color,
    method_marker,
    paper_style,
    plot_cosine_heatmap,
    plot_damping_sweep,
    plot_error_split,
    plot_kfc_checks,
    plot_layer_errors,
    plot_progress,
    plot_spectra,
    plot_training,
    save_figure,
)
from curvlab.plots.style import UNKNOWN_METHOD_COLORS, method_order
from curvlab.records import Record, to_dataframe

METHODS = ("exact", "kfac", "foof", "my-method")
LAYERS = ("0", "3", "7")


def synthetic_records() -> list[Record]:
    """A few records of every section the plots understand."""
    out: list[Record] = []
    for i, method in enumerate(METHODS):
        for j, ref in enumerate(("exact", "blockdiag")):
            out.append(Record("cosine", "cosine", method, 1.0 - 0.1 * i * (j + 1), reference=ref))
        for k in range(20):
            out.append(Record("spectrum", "eigenvalue", method, 10.0 ** (1 - k / (4 + i)), index=k))
        out.append(Record("spectrum", "eigenvalue", method, -1e-12, index=20))
        for lam in (1e-4, 1e-3, 1e-2, 1e-1):
            for metric in ("cosine", "relative_error"):
                value = 1 / (1 + i * lam) if metric == "cosine" else i * lam
                out.append(Record("damping", metric, method, value, reference="exact", damping=lam))
        for layer in LAYERS:
            out.append(
                Record(
                    "relative_error",
                    "relative_frobenius_error",
                    method,
                    0.1 * (i + 1),
                    layer=layer,
                    reference="exact",
                )
            )
        for metric, value in (("eigenbasis_error", 0.3), ("eigenvalue_error", 0.1 * i)):
            out.append(Record("relative_error", metric, method, value, reference="exact"))
        out.append(
            Record(
                "progress", "relative_loss_decrease", method, 0.2 - 0.05 * i, damping=1e-3 * (i + 1)
            )
        )
        for step in range(10):
            for seed in (0, 1):
                out.append(
                    Record(
                        "train",
                        "train_loss",
                        method,
                        math.exp(-0.1 * step * (i + 1)),
                        index=step,
                        extra={"seed": seed},
                    )
                )
    for layer in ("0", "3"):
        for metric, value in (("iad", 0.1), ("iad_sh", 0.2), ("kfc", 0.3)):
            out.append(Record("kfc_check", metric, "kfc", value, layer=layer))
        for offset in range(4):
            out.append(
                Record(
                    "kfc_check", "corr_activations", "kfc", 0.8**offset, layer=layer, index=offset
                )
            )
            out.append(
                Record(
                    "kfc_check", "corr_derivatives", "kfc", 0.5**offset, layer=layer, index=offset
                )
            )
    return out


PLOTS = [
    plot_cosine_heatmap,
    plot_spectra,
    plot_damping_sweep,
    plot_layer_errors,
    plot_error_split,
    plot_kfc_checks,
    plot_progress,
    plot_training,
]


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_every_plot_saves_png_pdf_svg(plot, tmp_path):
    fig = plot(synthetic_records())
    assert isinstance(fig, Figure)
    paths = save_figure(fig, tmp_path / "sub" / plot.__name__, formats=("png", "pdf", "svg"))
    assert [p.suffix for p in paths] == [".png", ".pdf", ".svg"]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert not [p for p in paths[0].parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_plots_accept_a_dataframe(plot):
    assert isinstance(plot(to_dataframe(synthetic_records())), Figure)


@pytest.mark.parametrize("plot", PLOTS, ids=lambda f: f.__name__)
def test_empty_input_is_a_clear_error(plot):
    with pytest.raises(ValueError, match="no records"):
        plot([])


def test_missing_section_names_what_is_there():
    records = [Record("cosine", "cosine", "kfac", 0.9, reference="exact")]
    with pytest.raises(ValueError, match="section 'spectrum'.*'cosine'"):
        plot_spectra(records)


def test_spectra_density_and_layer_choice():
    records = synthetic_records() + [Record("spectrum", "eigenvalue", "kfac", 2.0, layer="0")]
    assert isinstance(plot_spectra(records, kind="density"), Figure)
    assert isinstance(plot_spectra(records, layer="0"), Figure)
    with pytest.raises(ValueError, match="layer='9'.*'network'"):
        plot_spectra(records, layer="9")


def test_mixed_damping_must_be_chosen():
    records = [
        Record("cosine", "cosine", "kfac", 0.9, reference="exact", damping=1e-3),
        Record("cosine", "cosine", "kfac", 0.7, reference="exact", damping=1e-1),
    ]
    with pytest.raises(ValueError, match="damping"):
        plot_cosine_heatmap(records)
    assert isinstance(plot_cosine_heatmap(records, damping=1e-3), Figure)


def test_progress_with_several_metrics_needs_metric():
    records = [
        Record("progress", "relative_loss_decrease", "kfac", 0.1),
        Record("progress", "loss_after", "kfac", 1.0),
    ]
    with pytest.raises(ValueError, match="metric="):
        plot_progress(records)
    assert isinstance(plot_progress(records, metric="loss_after"), Figure)


def test_heatmap_cells_are_annotated():
    fig = plot_cosine_heatmap(synthetic_records())
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "1.00" in texts and "0.40" in texts


def test_method_colours_are_fixed_across_figures():
    records = synthetic_records()
    seen = []
    for subset in (METHODS, METHODS[::-1], METHODS[1:]):
        rows = [r for r in records if r.section == "progress" and r.method in subset]
        fig = plot_progress(rows)
        colours = {
            label.get_text(): mpl.colors.to_hex(patch.get_facecolor())
            for label, patch in zip(fig.axes[0].get_yticklabels(), fig.axes[0].patches, strict=True)
        }
        seen.append(colours)
    for colours in seen:
        for method, colour in colours.items():
            assert colour == method_color(method).lower()
    assert method_color("exact") == METHOD_COLORS["exact"]
    assert method_color("KFAC_standard") == METHOD_COLORS["kfac-standard"]


def test_unknown_method_colours_are_deterministic():
    assert method_color("my-method") == method_color("my-method")
    assert method_color("my-method") in UNKNOWN_METHOD_COLORS
    assert method_color("my-method") not in METHOD_COLORS.values()
    assert method_marker("other") == method_marker("other")
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)


def test_method_order_puts_known_methods_first():
    assert method_order(["zzz", "foof", "exact", "zzz", "aaa"]) == ["exact", "foof", "zzz", "aaa"]


def test_style_is_scoped_and_serif():
    before = mpl.rcParams["font.family"]
    with paper_style():
        assert mpl.rcParams["font.family"] == ["serif"]
    assert mpl.rcParams["font.family"] == before
    fig = plot_training(synthetic_records())
    label = fig.axes[0].xaxis.label
    assert label.get_fontfamily() == ["serif"]


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    fig = plot_progress(synthetic_records())
    stem = tmp_path / "progress"
    with pytest.raises(ValueError, match="unknown figure format 'bogus'"):
        save_figure(fig, stem, formats=("png", "bogus"))
    assert list(tmp_path.iterdir()) == []

    (png,) = save_figure(fig, stem, formats=("png",))
    old = png.read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("curvlab.plots.style.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_figure(plot_training(synthetic_records()), stem, formats=("png",))
    assert png.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]

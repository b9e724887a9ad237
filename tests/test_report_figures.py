"""Every figure of a comparison report is legible: tick labels do not overlap, titles fit
their axes, and no series is drawn unseen on top of another."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from torch import nn

from curvlab.compare import compare
from curvlab.data import load_dataset
from curvlab.models import build_model
from curvlab.plots import plot_progress
from curvlab.plots.style import fit_title, new_figure
from curvlab.records import Record
from curvlab.report.figures import report_figures

METHODS = ["exact", "blockdiag", "kfac", "kfac-standard", "foof", "ekfac", "sgd"]


@pytest.fixture(scope="module")
def figures() -> dict[str, Figure]:
    ds = load_dataset("digits", "train")
    X, y = ds.inputs[:16], ds.targets[:16]
    records: list[Record] = []
    for name in ("mlp", "cnn-max", "cnn-avg"):
        model = build_model(name, ds.input_shape, ds.num_classes, seed=0)
        found = compare(
            model,
            nn.CrossEntropyLoss(),
            X,
            y,
            methods=METHODS,
            damping=[1e-4, 1e-2, 1.0],
            lrs=[0.1, 1.0],
            max_eigenvalues=100,
            top_k=3,
            progress=False,
        )
        records += [dataclasses.replace(r, extra={**r.extra, "model": name}) for r in found]
    figs = report_figures(records, 1e-2, "exact")
    for fig in figs.values():
        fig.draw_without_rendering()
    return figs


def _boxes(labels) -> list[Bbox]:
    return [t.get_window_extent() for t in labels if t.get_visible() and t.get_text().strip()]


def _overlapping(boxes: list[Bbox]) -> list[tuple[int, int]]:
    shrunk = [Bbox.from_extents(b.x0 + 0.5, b.y0 + 0.5, b.x1 - 0.5, b.y1 - 0.5) for b in boxes]
    return [
        (i, j) for (i, a), (j, b) in itertools.combinations(enumerate(shrunk), 2) if a.overlaps(b)
    ]


def _axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_report_has_the_findings_figures(figures):
    assert {"findings_mlp", "findings_cnn-max", "findings_cnn-avg", "kfc_check_models"} <= set(
        figures
    )


def test_tick_labels_do_not_overlap(figures):
    for name, fig in figures.items():
        for k, ax in enumerate(_axes(fig)):
            for axis, labels in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
                clash = _overlapping(_boxes(labels))
                texts = [t.get_text() for t in labels if t.get_text().strip()]
                assert not clash, f"{name} axes {k}: {axis} tick labels overlap: {texts}"


def test_titles_fit_their_axes(figures):
    for name, fig in figures.items():
        for k, ax in enumerate(_axes(fig)):
            if ax.get_title():
                title = ax.title.get_window_extent().width
                width = ax.get_window_extent().width
                assert title <= width + 1, f"{name} axes {k}: title {title:.0f} > {width:.0f} px"
        if fig.get_suptitle():
            assert fig._suptitle.get_window_extent().width <= fig.bbox.width


def test_no_line_hides_another(figures):
    """Two lines drawn at the same place (every point within 1.5 px) must differ in line
    style, so that the lower one still shows between the dashes."""
    for name, fig in figures.items():
        for ax in _axes(fig):
            lines = [line for line in ax.get_lines() if len(line.get_xydata()) > 1]
            for a, b in itertools.combinations(lines, 2):
                pa = a.get_transform().transform(a.get_xydata())
                pb = b.get_transform().transform(b.get_xydata())
                if pa.shape != pb.shape:
                    continue
                distance = np.nanmax(np.linalg.norm(pa - pb, axis=1))
                if distance <= 1.5:
                    assert a.get_linestyle() != b.get_linestyle(), (
                        f"{name}: {a.get_label()} and {b.get_label()} coincide"
                    )


def test_coinciding_damping_lines_are_dodged_and_named(figures):
    fig = figures["damping_cosine_mlp"]
    ax = fig.axes[0]
    xs = [line.get_xdata()[0] for line in ax.get_lines()]
    assert len(set(np.round(xs, 12))) == len(xs)  # every method at its own x offset
    labels = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []
    labels += [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
    assert any("≈" in text for text in labels)  # ekfac ≈ kfac-standard on this problem


def test_long_method_names_do_not_overlap_in_progress_bars():
    names = ["kfac-standard", "foof", "kfac-backpack", "kfac-reduce", "blockdiag", "ekfac"]
    records = [Record("progress", "best_relative_loss_decrease", m, 0.1) for m in names]
    fig = plot_progress(records)
    fig.draw_without_rendering()
    for labels in (fig.axes[0].get_xticklabels(), fig.axes[0].get_yticklabels()):
        assert not _overlapping(_boxes(labels))


def test_fit_title_wraps_a_long_title():
    fig, axes = new_figure()
    ax = axes[0, 0]
    fit_title(ax, "cnn-max: λ = 0.01, best learning rate, steps rescaled to kfac's norms")
    fig.draw_without_rendering()
    assert "\n" in ax.get_title()
    assert ax.title.get_window_extent().width <= ax.get_window_extent().width

"""Reports of degenerate records render: zero, negative, infinite, NaN and huge values
(a diverged or saturated network) give figures, text and tables, never an exception; a
saturated network (an exactly zero Fisher) goes through every section of compare."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from curvlab.compare import compare
from curvlab.data import load_dataset
from curvlab.models import build_model
from curvlab.plots import plot_training
from curvlab.plots.style import figure_bytes
from curvlab.records import Record
from curvlab.report.figures import report_figures
from curvlab.report.findings import findings_tables
from curvlab.report.narrative import narrative
from curvlab.report.writer import write_report

CONFIG = {"headline_damping": 1e-2, "reference": "exact", "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def records() -> list[Record]:
    ds = load_dataset("digits", "train")
    model = build_model("cnn-max", ds.input_shape, ds.num_classes, seed=0)
    found = compare(
        model,
        nn.CrossEntropyLoss(),
        ds.inputs[:8],
        ds.targets[:8],
        methods=["exact", "kfac", "foof", "sgd"],
        damping=[1e-2, 1.0],
        lrs=[0.1, 1.0],
        max_eigenvalues=20,
        top_k=2,
        progress=False,
    )
    return [dataclasses.replace(r, extra={**r.extra, "model": "cnn-max"}) for r in found]


CORRUPTIONS = {
    "zero": lambda i, v: 0.0,
    "nan": lambda i, v: math.nan,
    "mixed": lambda i, v: (0.0, math.inf, math.nan, -1.0, -math.inf, 1e300, v)[i % 7],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_report_of_degenerate_values(records, corruption, tmp_path):
    change = CORRUPTIONS[corruption]
    bad = [dataclasses.replace(r, value=change(i, r.value)) for i, r in enumerate(records)]
    figures = report_figures(bad, CONFIG["headline_damping"], CONFIG["reference"])
    assert figures
    for fig in figures.values():
        fig.draw_without_rendering()
    if corruption == "mixed":
        write_report(
            tmp_path / "report",
            bad,
            CONFIG,
            figures,
            narrative(bad, CONFIG),
            formats=("png",),
            tables={"findings": findings_tables(bad, CONFIG)},
        )
        assert (tmp_path / "report" / "report.html").stat().st_size > 0


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, 1e300])
def test_training_plot_of_degenerate_values(value):
    rows = [
        Record("train", "loss", "sgd", v, index=i) for i, v in enumerate([2.3, 1.0, value, value])
    ]
    figure_bytes(plot_training(rows, metric="loss"), "png")


def test_saturated_network_compares_and_reports():
    """Softmax outputs exactly one-hot: every Fisher column and the Fisher are zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        model[2].bias[0] = 1e4
    X, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    found = compare(
        model,
        nn.CrossEntropyLoss(),
        X,
        y,
        methods=["exact", "kfac", "foof", "ekfac", "sgd"],
        damping=[1e-2, 1.0],
        lrs=[0.1],
        progress=False,
    )
    eigen = [r.value for r in found if r.section == "spectrum" and r.method == "exact"]
    assert all(v == 0 for v in eigen)
    for fig in report_figures(found, 1e-2, "exact").values():
        fig.draw_without_rendering()

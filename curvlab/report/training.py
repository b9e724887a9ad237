"""The rendering of a ``curvlab train`` report: figures and text from the training records.

Training loss, test accuracy/loss and step time per method, and the per-step compare
diagnostics along one trajectory (cosine to the exact natural gradient, best one-step
progress).  Text only restates records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from curvlab.plots import plot_training
from curvlab.records import Record, to_dataframe
from curvlab.train import final_loss


def train_figures(records: Sequence[Record]) -> dict[str, Figure]:
    """Training loss, test accuracy and loss, step time and the trajectory diagnostics."""
    df = to_dataframe(records)
    figs = {"train_loss": plot_training(records, metric="train_loss")}
    for metric in ("test_accuracy", "test_loss", "step_time"):
        if (df["metric"] == metric).any():
            figs[f"train_{metric}"] = plot_training(
                records, metric=metric, logy=metric != "test_accuracy"
            )
    labels = {
        "cosine": "cosine to the exact NG",
        "best_relative_loss_decrease": "best one-step relative loss decrease",
    }
    for metric, label in labels.items():
        if ((df["section"] == "trajectory") & (df["metric"] == metric)).any():
            fig = plot_training(records, metric=metric, logy=False, section="trajectory")
            fig.axes[0].set_ylabel(label)
            figs[f"trajectory_{metric}"] = fig
    return figs


def train_narrative(records: Sequence[Record], config: dict[str, Any]) -> dict[str, str]:
    """Summary and per-section text of a training report, from the measured records."""
    df = to_dataframe(records)
    steps = config["steps"]
    window = max(1, steps // 10)
    lines = []
    for m in config["methods"]:
        rows = df[df["method"] == m]
        loss = final_loss(records, m, window)
        acc = rows[(rows["section"] == "train") & (rows["metric"] == "test_accuracy")]
        time_rows = rows[rows["metric"] == "step_time"]["value"]
        hp = ", ".join(
            f"{k}={v:g}" for k, v in config["hyperparameters"][m].items() if isinstance(v, float)
        )
        status = (
            "diverged"
            if loss == float("inf")
            else f"final training loss {loss:.4g} (mean of the last {window} steps)"
        )
        extra = f", test accuracy {acc['value'].iloc[-1]:.3f}" if len(acc) else ""
        median = f", median step {time_rows.median() * 1e3:.1f} ms" if len(time_rows) else ""
        lines.append(f"- {m} ({hp}): {status}{extra}{median}.")
    text = {
        "summary": (
            f"curvlab trained {', '.join(config['methods'])} for {steps} steps of batch "
            f"{config['batch_size']} on '{config['data']}' with model {config['models'][0]}, "
            "all from the same initial weights and on the same mini-batches. Every value is "
            "in results.csv and results.json."
        ),
        "train": "\n".join(lines),
    }
    traj = df[df["section"] == "trajectory"]
    if len(traj):
        means = traj.groupby(["metric", "method"], sort=False)["value"].mean()
        parts = [
            f"{metric} {method}: {value:.3g}"
            for (metric, method), value in means.items()
            if pd.notna(value)
        ]
        text["trajectory"] = (
            f"Along the trajectory of {config['diagnose']}, every {config['diagnose_every']} "
            f"steps, on the current mini-batch with λ = {config['diagnose_damping']:g}: cosine of "
            "each method's direction to the exact natural gradient, and the best relative "
            "loss decrease of one step over a learning-rate grid. Means over the diagnosed "
            "steps: " + "; ".join(parts) + "."
        )
    return text

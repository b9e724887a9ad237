"""``curvlab train`` end to end in temporary folders, on a small configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvlab.cli import main
from curvlab.cli.train import resolve_train_config, run_train

SMALL = [
    "train",
    "--methods",
    "sgd,kfac,foof",
    "--steps",
    "4",
    "--batch-size",
    "32",
    "--train-size",
    "200",
    "--eval-every",
    "2",
    "--diagnose",
    "kfac",
    "--diagnose-every",
    "2",
    "--lr",
    "kfac=0.05",
    "--damping",
    "0.01",
    "--quiet",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "report"
    assert main([*SMALL, "--out", str(out)]) == 0
    return out


def test_report_files_and_config(report):
    payload = json.loads((report / "results.json").read_text())
    config = payload["config"]
    assert config["hyperparameters"]["kfac"] == {"lr": 0.05, "damping": 0.01}
    assert config["hyperparameters"]["sgd"] == {"lr": 0.3}  # default lr, no damping
    assert config["hyperparameters"]["foof"]["damping"] == 0.01
    sections = {r["section"] for r in payload["records"]}
    assert sections == {"train", "trajectory"}
    figures = {p.name for p in (report / "figures").iterdir()}
    for stem in ("train_loss", "train_test_accuracy", "trajectory_cosine"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures
    text = (report / "report.md").read_text()
    assert "final training loss" in text and "Along the trajectory of kfac" in text


def test_results_equal_the_python_api(report):
    payload = json.loads((report / "results.json").read_text())
    keep = {k: v for k, v in payload["config"].items() if k != "elapsed_seconds"}
    again = run_train(dict(keep), progress=False)

    def key(r):  # step_time is wall-clock: not reproducible
        return (r["section"], r["metric"], r["method"], r["index"], r.get("reference"))

    cli = {key(r): r["value"] for r in payload["records"] if r["metric"] != "step_time"}
    api = {key(r.to_dict()): r.value for r in again if r.metric != "step_time"}
    assert cli.keys() == api.keys()
    for k, v in api.items():
        assert cli[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_second_run_refuses_without_force(report, capsys):
    assert main([*SMALL, "--out", str(report)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "sgd,adam"], "unknown method 'adam'; choose from exact, blockdiag"),
        (["--lr", "kfac=abc"], "not a number"),
        (["--lr", "exact=0.1"], "not among --methods"),
        (["--damping", "sgd=0.1"], "'sgd', which has no damping"),
        (["--diagnose", "exact"], "--diagnose 'exact' is not among --methods"),
        (["--diagnose-methods", "kfac,nope"], "unknown method 'nope'"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--model", "vgg"], "unknown model 'vgg'"),
    ],
)
def test_invalid_options_are_one_line_errors(extra, message, tmp_path, capsys):
    assert main([*SMALL, *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_config_keeps_each_methods_defaults():
    from curvlab.cli import build_parser

    args = build_parser().parse_args(["train", "--methods", "exact,kfac-standard"])
    config = resolve_train_config(args)
    assert config["hyperparameters"]["exact"] == {"lr": 0.3, "damping": 0.1}
    assert config["hyperparameters"]["kfac-standard"]["damping_mode"] == "standard"

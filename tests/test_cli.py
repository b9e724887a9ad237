"""The ``curvlab`` command line end to end, in temporary folders, on a small config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab.cli import main
from curvlab.compare import compare
from curvlab.data import load_dataset
from curvlab.models import build_model

METHODS = "exact,kfac,foof,sgd"
SMALL = [
    "--model",
    "cnn-max",
    "--batch-size",
    "16",
    "--methods",
    METHODS,
    "--damping",
    "0.1,0.01",
    "--lr",
    "0.1,1",
    "--max-eigenvalues",
    "50",
    "--top-k",
    "3",
    "--quiet",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "report"
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    return out


def test_report_files(report):
    for name in ("report.md", "report.html", "results.json", "results.csv"):
        assert (report / name).is_file(), name
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no staging left
    payload = json.loads((report / "results.json").read_text())
    assert payload["seed"] == 0 and payload["device"] == "cpu"
    assert payload["config"]["models"] == ["cnn-max"]
    assert {"torch", "curvlab"} <= set(payload["environment"]["packages"])
    csv_rows = (report / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == len(payload["records"]) + 1
    sections = {r["section"] for r in payload["records"]}
    assert sections == {"cosine", "relative_error", "spectrum", "damping", "progress", "kfc_check"}
    figures = {p.name for p in (report / "figures").iterdir()}
    for stem in (
        "cosine_cnn-max",
        "relative_error_cnn-max",
        "spectrum_cnn-max",
        "damping_cosine_cnn-max",
        "progress_cnn-max",
        "kfc_check_cnn-max",
    ):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures, stem
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="figures/' not in html
    markdown = (report / "report.md").read_text()
    assert "## KFC assumption checks" in markdown and "relative error" in markdown
    # findings first: the table of methods x headline metrics, then the sections;
    # configuration and versions last (collapsed in the HTML)
    assert markdown.startswith("# curvlab report\n\n## Findings\n")
    header = "| method | cosine to the exact natural gradient (λ = 0.1) | relative Frobenius error"
    assert markdown.index(header) < markdown.index("## Update directions")
    assert "direction closest to the exact natural gradient" in markdown
    assert markdown.index("## KFC assumption") < markdown.index("## Configuration and versions")
    assert html.index('<section id="findings">') < html.index('<section id="cosine">')
    assert html.index('<section id="kfc_check">') < html.index('<details id="configuration">')


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_results_json_equals_the_python_api(report):
    """Rebuild the same problem with the public API: every record matches exactly."""
    payload = json.loads((report / "results.json").read_text())
    ds = load_dataset("digits")
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:16]
    model = build_model("cnn-max", ds.input_shape, 10, seed=0)
    records = compare(
        model,
        nn.CrossEntropyLoss(),
        ds.inputs[pick],
        ds.targets[pick],
        methods=METHODS.split(","),
        damping=(0.01, 0.1),
        lrs=(0.1, 1.0),
        rescale_to="kfac",
        max_eigenvalues=50,
        top_k=3,
        progress=False,
    )
    stored = payload["records"]
    assert len(stored) == len(records)
    for row, rec in zip(stored, records):
        expect = {**rec.to_dict(), "model": "cnn-max"}
        assert set(row) == set(expect)
        bad = {k: (row[k], expect[k]) for k in row if not _same(row[k], expect[k])}
        assert not bad, bad


def test_second_run_refuses_without_force(report, capsys):
    before = (report / "results.json").stat().st_mtime_ns
    assert main(["compare", *SMALL, "--out", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--force" in err and "already holds a curvlab report" in err
    assert (report / "results.json").stat().st_mtime_ns == before


def test_force_overwrites_and_svg_on_request(tmp_path):
    out = tmp_path / "rep"
    base = ["compare", "--model", "mlp", "--batch-size", "8", "--methods", "exact,kfac"]
    base += ["--damping", "0.1", "--quiet", "--out", str(out)]
    assert main([*base, "--sections", "cosine,relative_error"]) == 0
    assert (out / "figures" / "relative_error_mlp.png").is_file()
    assert main([*base, "--sections", "cosine", "--force", "--format", "svg"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["sections"] == ["cosine"]
    assert payload["config"]["formats"] == ["png", "pdf", "svg"]
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"cosine_mlp.png", "cosine_mlp.pdf", "cosine_mlp.svg"} <= figures
    assert "relative_error_mlp.png" not in figures  # the old report's figure is gone


BAD = [
    (["--methods", "kfac,nope"], "unknown method 'nope'; choose from exact, blockdiag, kfac"),
    (["--reference", "nope"], "choose from exact"),
    (["--model", "nope"], "unknown model 'nope'; choose from mlp, logreg"),
    (["--model", "no_such_module_xyz:make"], "cannot find module 'no_such_module_xyz'"),
    (["--data", "nope"], "unknown dataset 'nope'; choose from digits, mnist"),
    (["--damping", "0.1,-1"], "every damping must be a finite number > 0"),
    (["--damping", "abc"], "bad damping 'abc'"),
    (["--lr", "0"], "every learning rate must be a finite number > 0"),
    (["--sections", "cosine,nope"], "unknown section 'nope'; choose from cosine"),
    (["--inner", "sgd"], "no curvature"),
    (["--format", "png,gif"], "unknown figure format 'gif'; choose from png, pdf, svg"),
    (["--dtype", "float16"], "invalid choice: 'float16' (choose from"),
    (["--fisher", "nope"], "invalid choice: 'nope' (choose from"),
    (["--device", "tpu"], "choose from cpu, cuda"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--batch-size", "5000"], "exceeds the 1500 examples"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_invalid_options_are_one_line_errors(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--quiet", "--out", str(tmp_path / "r")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err, err
    assert err.startswith("curvlab compare: error:"), err
    assert message in err, err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_error(tmp_path, capsys):
    assert main(["compare", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "CUDA is not available" in err and "cpu" in err


def test_missing_data_files_are_an_error(tmp_path, capsys):
    argv = ["compare", "--data", "mnist", "--data-root", str(tmp_path), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not download" in err


def test_compare_on_mnist_5k_offline(tmp_path):
    """The built-in real MNIST subset needs no files under the data root."""
    out = tmp_path / "r"
    argv = ["compare", "--data", "mnist-5k", "--data-root", str(tmp_path / "empty")]
    argv += ["--model", "mlp", "--batch-size", "8", "--methods", "kfac,foof,sgd"]
    argv += ["--sections", "cosine", "--damping", "0.1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["data"] == "mnist-5k"
    assert {r["section"] for r in payload["records"]} == {"cosine"}


def test_user_model(tmp_path, monkeypatch):
    (tmp_path / "my_models_cli.py").write_text(
        "from torch import nn\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "rep"
    argv = ["compare", "--model", "my_models_cli:make", "--batch-size", "8", "--quiet"]
    argv += ["--methods", "exact,kfac", "--damping", "0.1", "--sections", "cosine"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "figures" / "cosine_my_models_cli-make.png").is_file()


def test_resnet_model(tmp_path):
    """The built-in ResNet (eval BatchNorm, depthwise conv) through compare; the summary
    names the layers that KFAC, EKFAC and FOOF treat exactly."""
    out = tmp_path / "rep"
    argv = ["compare", "--model", "resnet", "--batch-size", "8", "--quiet"]
    argv += ["--methods", "exact,kfac,ekfac,foof", "--damping", "0.1"]
    argv += ["--sections", "cosine,relative_error,damping"]
    assert main([*argv, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["problems"]["resnet"]["exact_layers"][:2] == ["1", "3.bn1"]
    assert (
        "exact layer block for the other layers (resnet: 1, 3.bn1"
        in (out / "report.md").read_text()
    )


def test_help_and_list(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("compare", "spectra", "damping", "kfc", "list", "relative_error", "report.html"):
        assert word in text
    assert main(["compare", "--help"]) == 0
    assert "--force" in capsys.readouterr().out
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "kfac-standard" in listing and "cnn-avg" in listing and "cifar10" in listing
    assert "resnet" in listing
    assert main([]) == 2


def test_installed_script_reports_errors_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("curvlab")
    if not script.exists():
        pytest.skip("the curvlab script is not installed next to this Python")
    proc = subprocess.run(
        [str(script), "kfc", "--methods", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown method 'nope'" in proc.stderr

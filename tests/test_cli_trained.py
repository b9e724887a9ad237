"""``curvlab compare --weights`` and ``--pretrain`` end to end: the diagnosed model is the
trained one (every record equals the Python API on an independently prepared model), the
trained point is recorded, and bad inputs are one-line errors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from curvlab.cli import main
from curvlab.compare import compare
from curvlab.data import load_dataset
from curvlab.models import build_model

SMALL = ["--batch-size", "16", "--methods", "exact,kfac,sgd", "--damping", "0.01"]
SMALL += ["--lr", "0.1,1", "--sections", "cosine,relative_error,progress", "--quiet"]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _assert_records_match(payload: dict, model: nn.Module, name: str) -> None:
    ds = load_dataset("digits")
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:16]
    records = compare(
        model,
        nn.CrossEntropyLoss(),
        ds.inputs[pick],
        ds.targets[pick],
        methods=["exact", "kfac", "sgd"],
        damping=(0.01,),
        lrs=(0.1, 1.0),
        sections=["cosine", "relative_error", "progress"],
        rescale_to="kfac",
        progress=False,
    )
    stored = payload["records"]
    assert len(stored) == len(records)
    for row, rec in zip(stored, records):
        expect = {**rec.to_dict(), "model": name}
        bad = {k: (row[k], expect[k]) for k in row if not _same(row[k], expect[k])}
        assert not bad, bad


def _trained_mlp(steps: int = 15) -> nn.Module:
    """An mlp moved away from its initialisation (so loading it is visible)."""
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, 10, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for k in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(ds.inputs[k * 32 : (k + 1) * 32]), ds.targets[k * 32 : (k + 1) * 32]
        ).backward()
        opt.step()
    return model


def test_weights_are_loaded_and_recorded(tmp_path):
    model = _trained_mlp()
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "rep"
    assert (
        main(["compare", "--model", "mlp", "--weights", str(path), *SMALL, "--out", str(out)]) == 0
    )
    payload = json.loads((out / "results.json").read_text())
    weights = payload["config"]["weights"]
    assert weights["path"] == str(path.resolve())
    assert weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert payload["config"]["pretrain"] is None
    _assert_records_match(payload, model, "mlp")
    assert f"with the weights of {path.resolve()}" in (out / "report.md").read_text()


def test_pretrain_trains_then_diagnoses(tmp_path):
    out = tmp_path / "rep"
    argv = ["compare", "--model", "mlp", "--pretrain", "12", "--pretrain-method", "adam"]
    argv += ["--pretrain-lr", "0.01", "--pretrain-batch-size", "64", *SMALL, "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    config = payload["config"]
    assert config["pretrain"] == {"steps": 12, "method": "adam", "lr": 0.01, "batch_size": 64}
    losses = config["problems"]["mlp"]["pretrain"]
    assert losses["last_loss"] < losses["first_loss"]

    # the same training, written independently: Adam on seeded mini-batches of the split
    ds = load_dataset("digits")
    model = build_model("mlp", ds.input_shape, 10, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    order, start = torch.randperm(len(ds), generator=generator), 0
    for _ in range(12):
        if start + 64 > len(ds):
            order, start = torch.randperm(len(ds), generator=generator), 0
        pick = order[start : start + 64]
        start += 64
        opt.zero_grad()
        nn.functional.cross_entropy(model(ds.inputs[pick]), ds.targets[pick]).backward()
        opt.step()
    _assert_records_match(payload, model, "mlp")
    text = (out / "report.md").read_text()
    assert "after 12 steps of adam (learning rate 0.01, batch 64)" in text


def test_weights_then_pretrain(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(_trained_mlp(5).state_dict(), path)
    out = tmp_path / "rep"
    argv = ["compare", "--model", "mlp", "--weights", str(path), "--pretrain", "3"]
    assert main([*argv, *SMALL, "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["weights"]["path"] == str(path.resolve())
    assert config["pretrain"] == {"steps": 3, "method": "sgd", "lr": 0.1, "batch_size": 16}


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "make, model, message",
    [
        (lambda d: d / "absent.pt", "mlp", "no such file"),
        (lambda d: _save(d / "list.pt", [1, 2]), "mlp", "not a state_dict"),
        (lambda d: (d / "junk.pt").write_text("junk") and d / "junk.pt", "mlp", "not a readable"),
        (
            lambda d: _save(d / "cnn.pt", build_model("cnn-max", (1, 8, 8), 10).state_dict()),
            "mlp",
            "does not fit model 'mlp': keys missing",
        ),
        (
            lambda d: _save(
                d / "wide.pt", build_model("mlp", (1, 8, 8), 10, hidden=(16, 32)).state_dict()
            ),
            "mlp",
            "has shape (16, 64) in the file and (64, 64) in the model",
        ),
        (lambda d: _save(d / "m.pt", {}), "mlp,cnn-max", "--weights fits one model"),
    ],
)
def test_bad_weights_are_one_line_errors(make, model, message, tmp_path, capsys):
    path = make(tmp_path)
    out = tmp_path / "rep"
    argv = ["compare", "--model", model, "--weights", str(path), *SMALL, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pretrain", "-1"], "--pretrain must be an integer >= 0"),
        (["--pretrain", "2", "--pretrain-method", "rmsprop"], "choose from sgd, adam"),
        (["--pretrain", "2", "--pretrain-lr", "0"], "--pretrain-lr must be"),
        (["--pretrain", "2", "--pretrain-batch-size", "0"], "--pretrain-batch-size must be"),
        (["--pretrain", "5", "--pretrain-lr", "1e38"], "pretraining diverged"),
        (
            ["--pretrain", "5", "--pretrain-lr", "1e30"],
            "pretraining diverged at --pretrain-lr 1e+30 (sgd, 5 steps): the loss of the "
            "first mini-batch went from 2.3 to",
        ),
        (["--pretrain", "5", "--pretrain-lr", "1e3"], "the loss of the first mini-batch went"),
    ],
)
def test_bad_pretraining_options_are_one_line_errors(extra, message, tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["compare", "--model", "mlp", *extra, *SMALL, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    if "diverged" in message:
        assert err.endswith("lower --pretrain-lr"), err
    assert not (out / "results.json").exists()

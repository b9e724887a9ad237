"""One method registry: a toy approximation registered at run time runs through
``curvlab.compare``, the report writer, the CLI (``--plugin``) and ``train``, with
nothing in ``curvlab/compare`` knowing about it."""

from __future__ import annotations

import json
import math
import shutil
from copy import deepcopy
from pathlib import Path

import pytest
import reference as R
import torch
from conftest import RTOL, get_problem

import curvlab
from curvlab.cli import main
from curvlab.compare import METHODS, Analysis, relative_errors
from curvlab.methods import TRAIN_METHODS, check_methods, register_method, unregister_method
from curvlab.report import load_results, write_report
from curvlab.train import stepper

TOY = "toy-identity"


@pytest.fixture
def toy():
    import toy_method

    toy_method.register()
    yield toy_method
    unregister_method(TOY)


def test_registered_method_is_in_every_view(toy):
    assert TOY in METHODS and TOY in TRAIN_METHODS
    assert check_methods(["exact", TOY]) == ["exact", TOY]
    unregister_method(TOY)
    assert TOY not in METHODS
    with pytest.raises(ValueError, match=f"unknown method '{TOY}'"):
        check_methods([TOY])


def test_register_refuses_bad_names_and_duplicates():
    with pytest.raises(ValueError, match="bad method name"):
        register_method("a,b", "x", lambda a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_method("kfac", "x", lambda a: None)
    with pytest.raises(ValueError, match="needs a curvature builder or an optimizer"):
        register_method("nothing", "x")


def test_toy_relative_error_and_cosines_match_dense(toy):
    """The interface defaults (``fisher_inner`` through ``mv``) against dense F."""
    prob = get_problem("mlp_tanh", "ce-mean")
    analysis = Analysis(prob.model, prob.loss_fn, prob.X, prob.y)
    F = prob.ggn()
    c = float(F.trace()) / prob.P
    C = c * torch.eye(prob.P, dtype=torch.float64)
    errs = relative_errors(analysis, TOY)
    assert errs["network"][0] == pytest.approx(float((C - F).norm() / F.norm()), rel=RTOL)
    cos = float((C * F).sum() / (C.norm() * F.norm()))
    assert errs["network"][1] == pytest.approx(cos, rel=RTOL)
    ref = prob.ref("exact")
    Fbd = R.block_diagonal_part(F, ref.records)
    for rec in ref.records:
        Fl = Fbd[rec.slice, rec.slice]
        Cl = c * torch.eye(rec.size, dtype=torch.float64)
        assert errs[rec.name][0] == pytest.approx(float((Cl - Fl).norm() / Fl.norm()), rel=RTOL)


def test_toy_through_compare_and_report_writer(toy, tmp_path):
    prob = get_problem("mlp_tanh", "ce-mean")
    records = curvlab.compare(
        prob.model,
        prob.loss_fn,
        prob.X,
        prob.y,
        methods=["exact", "kfac", "foof", TOY],
        damping=[1e-2, 1.0],
        lrs=[0.1, 1.0],
        top_k=3,
        progress=False,
    )
    mine = {(r.section, r.metric) for r in records if r.method == TOY}
    for section in ("cosine", "relative_error", "spectrum", "damping", "progress"):
        assert any(s == section for s, _ in mine), section
    lam = 1e-2
    (cos,) = [
        r.value
        for r in records
        if (r.section, r.metric, r.method, r.reference, r.layer, r.damping)
        == ("cosine", "cosine", TOY, "exact", "network", lam)
    ]
    F, g = prob.ggn(), prob.grad()  # the toy's direction g / (c + λ) is parallel to g
    ng = torch.linalg.solve(F + lam * torch.eye(prob.P, dtype=F.dtype), g)
    assert cos == pytest.approx(float(g @ ng / (g.norm() * ng.norm())), rel=1e-10)
    out = write_report(tmp_path / "rep", records, {"seed": 0, "device": "cpu"})
    _, loaded = load_results(out)
    assert sorted(r.to_dict().items().__repr__() for r in loaded if r.method == TOY) == sorted(
        r.to_dict().items().__repr__() for r in records if r.method == TOY
    )
    assert TOY in (out / "report.md").read_text()


def test_toy_through_the_cli_plugin_option(tmp_path, monkeypatch, capsys):
    shutil.copy(Path(__file__).with_name("toy_method.py"), tmp_path / "toy_plugin_cli.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "rep"
    argv = ["compare", "--plugin", "toy_plugin_cli:register", "--model", "logreg"]
    argv += ["--batch-size", "8", "--methods", f"exact,kfac,{TOY}", "--damping", "0.1"]
    argv += ["--lr", "0.1,1", "--top-k", "2", "--quiet", "--out", str(out)]
    try:
        assert main(argv) == 0
        payload = json.loads((out / "results.json").read_text())
        assert any(row["method"] == TOY for row in payload["records"])
        assert payload["config"]["plugins"] == ["toy_plugin_cli:register"]
        assert TOY in (out / "report.md").read_text()
        assert main(["list", "--plugin", "toy_plugin_cli:register"]) == 0
        assert TOY in capsys.readouterr().out
        train_out = tmp_path / "train"
        argv = ["train", "--plugin", "toy_plugin_cli:register", "--methods", f"sgd,{TOY}"]
        argv += ["--model", "logreg", "--steps", "3", "--batch-size", "16", "--diagnose", "none"]
        argv += ["--quiet"]
        assert main([*argv, "--out", str(train_out)]) == 0
        payload = json.loads((train_out / "results.json").read_text())
        losses = [r["value"] for r in payload["records"] if r["method"] == TOY]
        assert losses and all(math.isfinite(v) for v in losses)
    finally:
        unregister_method(TOY)


def test_bad_plugin_is_a_one_line_error(tmp_path, capsys):
    argv = ["compare", "--plugin", "no_such_plugin_xyz:register", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot import plugin module 'no_such_plugin_xyz'" in err and err.count("\n") == 1


def test_registered_method_trains_one_batch_at_a_time(toy):
    """Without an optimizer a method trains with its curvature rebuilt per batch:
    one step is θ − lr · C.solve(g, λ)."""
    prob = get_problem("mlp_tanh", "ce-mean")
    model = prob.model
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    copy = deepcopy(model)
    stepper(TOY, prob.loss_fn, lr=0.5, damping=0.1, fisher="exact")(copy)(prob.X, prob.y)
    after = torch.cat([p.detach().reshape(-1) for p in copy.parameters()])
    c = float(prob.ggn().trace()) / prob.P
    torch.testing.assert_close(after, before - 0.5 * prob.grad() / (c + 0.1), rtol=1e-10, atol=0)

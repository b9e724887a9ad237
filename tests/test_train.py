"""Training trajectories (:mod:`curvlab.train`): steppers, shared start and batches,
divergence handling, per-step diagnostics and the grid search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.compare.cosine import cosine
from curvlab.records import Record, to_dataframe
from curvlab.train import (
    TRAIN_METHODS,
    Diagnostics,
    Problem,
    batches,
    budget_losses,
    grid_search,
    stepper,
    steps_to_threshold,
    train,
)

TOL = 1e-10  # float64 throughout


def make_problem(n: int = 48) -> Problem:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    Xt = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    yt = (Xt[:, 0] + Xt[:, 1] > 0).long()

    def make_model() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    return Problem(make_model, nn.CrossEntropyLoss(), (X, y), (Xt, yt))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_batches_cover_each_epoch_once():
    gen = torch.Generator().manual_seed(0)
    idx = list(batches(10, 3, 6, gen))
    assert len(idx) == 6 and all(len(i) == 3 for i in idx)
    first_epoch = torch.cat(idx[:3])
    assert len(set(first_epoch.tolist())) == 9  # no repeats within an epoch
    full = list(batches(10, 50, 2, torch.Generator().manual_seed(0)))
    assert [sorted(i.tolist()) for i in full] == [list(range(10))] * 2


def test_sgd_and_exact_ng_steppers_take_the_documented_step():
    prob = make_problem()
    X, y = prob.train
    for name, lr, lam in (("sgd", 0.2, None), ("exact", 0.3, 0.05)):
        model = prob.make_model()
        before = flat_params(model)
        capt = curvlab.capture(model, prob.loss_fn, X, y, fisher="exact")
        direction = capt.grad if lam is None else curvlab.ExactFisher(capt).solve(capt.grad, lam)
        hp = {"lr": lr} if lam is None else {"lr": lr, "damping": lam, "fisher": "exact"}
        loss = stepper(name, prob.loss_fn, **hp)(model)(X, y)
        assert loss == pytest.approx(capt.loss, rel=1e-12)
        torch.testing.assert_close(flat_params(model), before - lr * direction, rtol=TOL, atol=TOL)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'adam'; choose from exact, .*sgd"):
        stepper("adam", nn.CrossEntropyLoss())


def blow_up_after(k: int):
    """A stepper factory whose update makes the parameters NaN after ``k`` steps."""

    def make(model: nn.Module):
        sgd = stepper("sgd", nn.CrossEntropyLoss(), lr=0.1)(model)
        calls = []

        def step(inputs, targets):
            loss = sgd(inputs, targets)
            calls.append(1)
            if len(calls) == k:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            return loss

        return step

    return make


def test_methods_share_start_and_batches_and_a_diverging_one_stops():
    prob = make_problem()
    methods = {
        "sgd": stepper("sgd", prob.loss_fn, lr=0.1),
        "kfac": stepper("kfac", prob.loss_fn, lr=0.1, damping=0.1),
        "blow-up": blow_up_after(2),
    }
    records = train(prob, methods, steps=6, batch_size=16, eval_every=3, progress=False)
    df = to_dataframe(records)
    loss = df[df["metric"] == "train_loss"]
    first = loss[loss["index"] == 0].set_index("method")["value"]
    assert first["sgd"] == first["kfac"] == first["blow-up"]  # same start, same batch
    assert len(loss[loss["method"] == "sgd"]) == 6
    assert set(df[df["metric"] == "test_accuracy"]["index"]) == {3, 6}
    blown = loss[loss["method"] == "blow-up"]
    assert len(blown) == 3 and not math.isfinite(blown["value"].iloc[-1])
    assert records[[r.method for r in records].index("blow-up")].section == "train"
    assert any(r.extra.get("diverged") for r in records if r.method == "blow-up")


def test_diagnostics_follow_one_trajectory():
    prob = make_problem()
    diag = Diagnostics("kfac", every=2, methods=("kfac", "foof", "sgd"), damping=0.1)
    methods = {
        "sgd": stepper("sgd", prob.loss_fn, lr=0.1),
        "kfac": stepper("kfac", prob.loss_fn, lr=0.1, damping=0.1, fisher="exact"),
    }
    records = train(prob, methods, 5, 16, diagnostics=diag, progress=False)
    traj = [r for r in records if r.section == "trajectory"]
    assert {r.index for r in traj} == {0, 2, 4}
    assert {r.extra["follow"] for r in traj} == {"kfac"}
    # Step 0 is diagnosed on the initial model and the first batch: recompute by hand.
    X, y = prob.train
    idx = next(batches(X.shape[0], 16, 1, torch.Generator().manual_seed(0)))
    capt = curvlab.capture(prob.make_model(), prob.loss_fn, X[idx], y[idx], fisher="exact")
    ng = curvlab.ExactFisher(capt).solve(capt.grad, 0.1)
    foof = curvlab.FOOF(capt).solve(capt.grad, 0.1)
    (row,) = [r for r in traj if r.index == 0 and r.metric == "cosine" and r.method == "foof"]
    assert row.reference == "exact"
    assert row.value == pytest.approx(cosine(foof, ng), rel=1e-10)
    progress = {r.method for r in traj if r.metric == "best_relative_loss_decrease"}
    assert progress == {"exact", "kfac", "foof", "sgd"}


def test_diagnostics_must_follow_a_trained_method():
    prob = make_problem()
    with pytest.raises(ValueError, match="not among the methods"):
        train(
            prob,
            {"sgd": stepper("sgd", prob.loss_fn)},
            2,
            8,
            diagnostics=Diagnostics("kfac"),
            progress=False,
        )


def test_grid_search_prefers_progress():
    prob = make_problem()
    best, records = grid_search(
        prob, "sgd", {"lr": [1e-6, 0.3, 1e30]}, steps=8, batch_size=48, progress=False
    )
    assert best == {"lr": 0.3}
    scores = {r.extra["lr"]: r.value for r in records}
    assert scores[0.3] < scores[1e-6] < scores[1e30]


def test_every_builtin_method_trains():
    prob = make_problem()
    hp = {"singd": {"lr": 0.05}, "sgd": {"lr": 0.3}}
    methods = {
        m: stepper(m, prob.loss_fn, **hp.get(m, {"lr": 0.1, "damping": 0.1})) for m in TRAIN_METHODS
    }
    records = train(prob, methods, steps=15, batch_size=48, progress=False)
    df = to_dataframe(records)
    loss = df[df["metric"] == "train_loss"].groupby("method")["value"]
    assert (loss.last() < loss.first()).all(), loss.agg(["first", "last"])


def test_grid_search_scores_divergence_as_inf():
    prob = make_problem()
    best, records = grid_search(
        prob, "sgd", {"lr": [0.1, float("nan")]}, steps=3, batch_size=48, progress=False
    )
    assert best == {"lr": 0.1}
    assert [r.value for r in records][1] == math.inf


def test_a_step_that_raises_on_divergence_stops_only_its_method():
    """Optimizers raise (non-finite statistics, failed factorisations) when a run
    diverges; train records that method as diverged and runs the others."""
    prob = make_problem()

    def make_failing(model):
        def step(inputs, targets):
            raise curvlab.errors.SingularMatrixError("F_c + λI is not positive definite")

        return step

    methods = {"fails": make_failing, "sgd": stepper("sgd", prob.loss_fn, lr=0.1)}
    records = train(prob, methods, steps=3, batch_size=16, progress=False)
    (failed,) = [r for r in records if r.method == "fails" and r.metric == "train_loss"]
    assert failed.extra["diverged"] and "SingularMatrixError" in failed.extra["error"]
    assert len([r for r in records if r.method == "sgd" and r.metric == "train_loss"]) == 3


def test_grid_extends_where_the_optimum_sits_on_an_edge():
    """App. D.2: lr 1e-3 and 1e-2 are both too small; the grid grows by decades until the
    best learning rate is interior (or the rounds run out)."""
    prob = make_problem()
    best, records = grid_search(
        prob, "sgd", {"lr": [1e-3, 1e-2]}, steps=8, batch_size=48, progress=False, extend=5
    )
    tried = {round(r.extra["lr"], 12): r.extra["round"] for r in records}
    assert tried[1e-3] == tried[1e-2] == 0 and tried[0.1] == 1 and tried[1.0] == 2
    scores = {round(r.extra["lr"], 12): r.value for r in records}
    assert best["lr"] == pytest.approx(min(scores, key=scores.get))
    ordered = sorted(scores)
    assert ordered[0] < best["lr"] < ordered[-1]  # interior at the end
    assert [r.extra.get("best", False) for r in records].count(True) == 1
    fixed, _ = grid_search(
        prob, "sgd", {"lr": [1e-3, 1e-2]}, steps=8, batch_size=48, progress=False
    )
    assert fixed == {"lr": 1e-2}  # no extension: the edge value


def test_budget_losses_and_steps_to_threshold():
    rows = [Record("train", "train_loss", "m", v, index=k) for k, v in enumerate([4, 3, 2, 1, 0.5])]
    assert budget_losses(rows, "m", [1, 3, 5, 9]) == {1: 4, 3: 2, 5: 0.5} | {
        9: pytest.approx(math.nan, nan_ok=True)
    }
    assert budget_losses(rows, "m", [4], window=2) == {4: 1.5}
    assert steps_to_threshold(rows, "m", 2.5) == 2 and steps_to_threshold(rows, "m", 0.1) is None
    broken = rows[:2] + [
        Record("train", "train_loss", "m", math.nan, index=2, extra={"diverged": True})
    ]
    assert budget_losses(broken, "m", [2, 3]) == {2: 3, 3: math.inf}
    assert steps_to_threshold(broken, "m", 0.1) is None

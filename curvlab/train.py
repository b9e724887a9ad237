"""Training trajectories: run several update rules on one problem and log tidy records.

Each method is a *stepper factory*: ``make(model) -> step`` where ``step(inputs, targets)``
performs one update of ``model`` in place and returns the mini-batch loss before the
update.  :func:`stepper` builds the factories of the registered methods
(:data:`TRAIN_METHODS`, the training view of :mod:`curvlab.methods`; names as in
:mod:`curvlab.compare`: ``"exact"`` is the exact natural gradient) from their
optimizers in :mod:`curvlab.optim`; a method without a dedicated optimizer trains with
its curvature rebuilt from each mini-batch
(:class:`~curvlab.optim.one_batch.OneBatchCurvature`).  :func:`train` gives every method a fresh
copy of the same initial model and the same mini-batch sequence, and returns records:

* section ``"train"``: ``train_loss`` (index = step, the mini-batch loss before each
  update), ``step_time`` (wall-clock seconds of the update), ``test_loss`` /
  ``test_accuracy`` (on the test set every ``eval_every`` steps and at the end);
* section ``"trajectory"`` (with :class:`Diagnostics`): along the trajectory of one
  method, every ``every`` steps and before its update, the compare metrics on the
  current mini-batch: cosine of each method's direction to the exact natural gradient
  (``metric="cosine"``, ``reference="exact"``) and the best relative loss decrease of
  one step over a learning-rate grid (``metric="best_relative_loss_decrease"``).

:func:`grid_search` tries every combination of a hyperparameter grid for one method.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from curvlab.compare.analysis import Analysis
from curvlab.compare.cosine import cosine_records
from curvlab.compare.progress import progress_records
from curvlab.compare.run import DEFAULT_LRS
from curvlab.errors import NonFiniteError, OptionError, SingularMatrixError
from curvlab.independence import evaluation_mode
from curvlab.losses import loss_value
from curvlab.methods import TRAIN_METHODS, check_methods, check_train_methods
from curvlab.records import NETWORK, Record

__all__ = [
    "DIVERGENCE_ERRORS",
    "TRAIN_METHODS",
    "Diagnostics",
    "Problem",
    "batches",
    "check_train_methods",
    "evaluate",
    "final_loss",
    "grid_search",
    "stepper",
    "train",
]

DIVERGENCE_ERRORS = (NonFiniteError, SingularMatrixError, torch.linalg.LinAlgError)
"""Errors a diverging run raises inside a step (non-finite outputs or statistics, a
curvature matrix that cannot be factorised); :func:`train` records them as divergence."""

Step = Callable[[Tensor, Tensor], float]
StepperFactory = Callable[[nn.Module], Step]


def stepper(name: str, loss_fn: nn.Module, **hparams: Any) -> StepperFactory:
    """The stepper factory of registered method ``name`` with ``hparams`` over its defaults.

    ``hparams`` are keyword arguments of the method's optimizer (``lr``, ``damping``,
    ``momentum``, ``fisher``, ...; SGD takes ``lr``, ``momentum``, ``weight_decay``).
    """
    check_train_methods([name])
    method = TRAIN_METHODS[name]

    def make(model: nn.Module) -> Step:
        return method.make_optimizer(model, loss_fn, **hparams).step

    return make


@dataclass
class Problem:
    """A training problem: model factory, loss and data (tensors on one device).

    Attributes:
        make_model: Returns a freshly initialised model (called once; copies are
            made for each method so all start from the same weights).
        loss_fn: The training loss.
        train: ``(inputs, targets)`` of the training set.
        test: ``(inputs, targets)`` of the test set, or ``None``.
    """

    make_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None = None


@dataclass
class Diagnostics:
    """Per-step compare metrics along the trajectory of one method.

    Attributes:
        follow: The method (a key of ``methods`` in :func:`train`) whose trajectory is
            diagnosed.
        every: Diagnose every this many steps (step 0 included).
        methods: Compare methods (:data:`curvlab.compare.METHODS`) whose directions are
            measured at each diagnosed point; ``"exact"`` is always the reference.
        damping: The λ of every direction.
        fisher: Fisher type of the curvature objects (``"exact"`` = GGN).
        lrs: Learning-rate grid of the progress metric.
    """

    follow: str
    every: int = 10
    methods: Sequence[str] = ("kfac", "foof", "blockdiag", "sgd")
    damping: float = 1e-3
    fisher: str = "exact"
    lrs: Sequence[float] = field(default_factory=lambda: list(DEFAULT_LRS))

    def __post_init__(self) -> None:
        if int(self.every) != self.every or self.every < 1:
            raise OptionError(f"Diagnostics.every must be a positive integer, got {self.every!r}")
        check_methods(list(self.methods))
        if not self.damping > 0:
            raise OptionError(f"Diagnostics.damping must be > 0, got {self.damping!r}")

    def records(
        self, model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, step: int
    ) -> list[Record]:
        """Section ``"trajectory"`` records at ``step`` for the current parameters,
        computed in eval mode (no dropout masks, BatchNorm running statistics; every
        module's mode restored after), so that every loss evaluation is repeatable."""
        with evaluation_mode(model):
            return self._records(model, loss_fn, inputs, targets, step)

    def _records(
        self, model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, step: int
    ) -> list[Record]:
        analysis = Analysis(model, loss_fn, inputs, targets, fisher=self.fisher)
        others = [m for m in self.methods if m != "exact"]
        found = cosine_records(
            analysis, ["exact", *others], [self.damping], "exact", inner_products=(), pairwise=False
        )
        found = [r for r in found if r.layer == NETWORK]
        found += [
            r
            for r in progress_records(analysis, ["exact", *others], [self.damping], self.lrs)
            if r.metric == "best_relative_loss_decrease"
        ]
        extra = {"follow": self.follow}
        return [
            dataclasses.replace(r, section="trajectory", index=step, extra={**r.extra, **extra})
            for r in found
        ]


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of ``steps`` mini-batches, reshuffling each epoch (full batch if
    ``batch_size >= n``)."""
    size = min(batch_size, n)
    produced = 0
    while produced < steps:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):
            if produced == steps:
                return
            yield order[i : i + size]
            produced += 1


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, data: tuple[Tensor, Tensor]) -> dict:
    """Loss (with ``loss_fn``) and classification accuracy (argmax) on ``data``, in eval
    mode (every module's mode restored after)."""
    inputs, targets = data
    with evaluation_mode(model):
        out = model(inputs)
    result = {"loss": float(loss_value(loss_fn, out, targets))}
    if not targets.dtype.is_floating_point and targets.shape == out.shape[:-1]:
        # class dimension last; one prediction per position for outputs (N, ..., C)
        result["accuracy"] = float((out.argmax(dim=-1) == targets).float().mean())
    return result


def train(
    problem: Problem,
    methods: Mapping[str, StepperFactory],
    steps: int,
    batch_size: int,
    seed: int = 0,
    eval_every: int | None = None,
    diagnostics: Diagnostics | None = None,
    progress: bool = True,
) -> list[Record]:
    """Run every method for ``steps`` updates from the same start on the same batches.

    Args:
        problem: Model factory, loss and data.
        methods: Name -> stepper factory (e.g. ``{"kfac": stepper("kfac", loss_fn)}``).
        steps: Updates per method.
        batch_size: Mini-batch size (the full training set if larger).
        seed: Seed of the mini-batch order (the same for every method).
        eval_every: Evaluate on the test set every this many steps (and at the end).
        diagnostics: Compare metrics along the trajectory of ``diagnostics.follow``.
        progress: Show a progress bar.

    Each method runs with torch's CPU random generator seeded with ``seed`` (sampled
    Fisher labels are reproducible); the caller's generator state is restored after.

    Returns:
        Records of sections ``"train"`` and ``"trajectory"`` (module docstring).  A
        method whose loss becomes non-finite, or whose step raises one of
        :data:`DIVERGENCE_ERRORS`, stops early (its last ``train_loss`` record has
        ``extra={"diverged": True}``, and ``"error"`` with the message when one was
        raised) instead of aborting the others.
    """
    if int(steps) != steps or steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if diagnostics is not None and diagnostics.follow not in methods:
        raise OptionError(
            f"diagnostics follow '{diagnostics.follow}', which is not among the methods "
            f"({', '.join(methods)})"
        )
    initial = problem.make_model()
    records: list[Record] = []
    bar = tqdm(total=steps * len(methods), disable=not progress, desc="train", leave=False)
    for name, make in methods.items():
        bar.set_postfix_str(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # reproducible sampled (MC) labels, the same per method
            records += _run_method(
                name,
                make,
                copy.deepcopy(initial),
                problem,
                steps,
                batch_size,
                seed,
                eval_every,
                diagnostics,
                bar,
            )
    bar.close()
    return records


def _run_method(
    name: str,
    make: StepperFactory,
    model: nn.Module,
    problem: Problem,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int | None,
    diagnostics: Diagnostics | None,
    bar: tqdm,
) -> list[Record]:
    """The records of one method's run (see :func:`train`)."""
    inputs, targets = problem.train
    records: list[Record] = []
    step = make(model)
    gen = torch.Generator().manual_seed(seed)
    for k, idx in enumerate(batches(inputs.shape[0], batch_size, steps, gen)):
        idx = idx.to(inputs.device)
        x, y = inputs[idx], targets[idx]
        if diagnostics is not None and name == diagnostics.follow and k % diagnostics.every == 0:
            records += diagnostics.records(model, problem.loss_fn, x, y, k)
        start = time.perf_counter()
        try:
            loss = float(step(x, y))
        except DIVERGENCE_ERRORS as err:
            records.append(
                Record(
                    "train",
                    "train_loss",
                    name,
                    math.nan,
                    index=k,
                    extra={"diverged": True, "error": f"{type(err).__name__}: {err}"},
                )
            )
            break
        elapsed = time.perf_counter() - start
        bar.update(1)
        if not math.isfinite(loss):
            records.append(
                Record("train", "train_loss", name, loss, index=k, extra={"diverged": True})
            )
            break
        records.append(Record("train", "train_loss", name, loss, index=k))
        records.append(Record("train", "step_time", name, elapsed, index=k))
        if problem.test is not None and eval_every and (k + 1) % eval_every == 0:
            records += _eval_records(model, problem, name, k + 1)
    if problem.test is not None and not (eval_every and steps % eval_every == 0):
        records += _eval_records(model, problem, name, steps)
    return records


def _eval_records(model: nn.Module, problem: Problem, name: str, step: int) -> list[Record]:
    metrics = evaluate(model, problem.loss_fn, problem.test)
    return [Record("train", f"test_{k}", name, v, index=step) for k, v in metrics.items()]


def final_loss(records: Sequence[Record], method: str, window: int) -> float:
    """Mean ``train_loss`` of ``method`` over its last ``window`` steps (``inf`` if it
    diverged or has none)."""
    losses = [r for r in records if r.metric == "train_loss" and r.method == method]
    if not losses or any(r.extra.get("diverged") for r in losses):
        return math.inf
    tail = [r.value for r in losses[-window:]]
    return sum(tail) / len(tail)


def budget_losses(
    records: Sequence[Record], method: str, budgets: Sequence[int], window: int = 1
) -> dict[int, float]:
    """``method``'s training loss after each step budget: the mean ``train_loss`` over the
    ``window`` steps before step ``b`` (indices ``b − window .. b − 1``), per ``b`` in
    ``budgets``; ``inf`` once the run diverged before ``b``, NaN when it has not reached ``b``
    (so methods that all reach a loss of ~0 in the end can still be told apart early)."""
    losses = {r.index: r for r in records if r.metric == "train_loss" and r.method == method}
    diverged = [k for k, r in losses.items() if r.extra.get("diverged")]
    out = {}
    for b in budgets:
        if diverged and min(diverged) < b:
            out[b] = math.inf
            continue
        tail = [losses[k].value for k in range(max(0, b - window), b) if k in losses]
        out[b] = sum(tail) / len(tail) if len(tail) == min(window, b) and tail else math.nan
    return out


def steps_to_threshold(records: Sequence[Record], method: str, threshold: float) -> int | None:
    """The first step whose ``train_loss`` (before the update) is ≤ ``threshold``, or
    ``None`` if ``method``'s run never gets there (or diverged first)."""
    losses = sorted(
        (r for r in records if r.metric == "train_loss" and r.method == method),
        key=lambda r: r.index,
    )
    for r in losses:
        if r.extra.get("diverged"):
            return None
        if r.value <= threshold:
            return r.index
    return None


def grid_search(
    problem: Problem,
    method: str,
    grid: Mapping[str, Sequence[Any]],
    steps: int,
    batch_size: int,
    seed: int = 0,
    fixed: Mapping[str, Any] | None = None,
    progress: bool = True,
    extend: int = 0,
    score_steps: int | None = None,
) -> tuple[dict[str, Any], list[Record]]:
    """Train built-in ``method`` with every combination of ``grid`` and pick the best.

    The score of a combination is its mean training loss over the last
    ``max(1, steps // 10)`` steps (``inf`` when it diverges), or, with ``score_steps``,
    its loss after that step budget (:func:`budget_losses`, window ``max(1,
    score_steps // 10)``), so that runs which all reach a loss of ~0 by ``steps`` are
    still ranked.

    With ``extend > 0`` the grid grows where the optimum sits on its edge (Benzing 2022,
    App. D.2): while the best value of a numeric hyperparameter with at least two
    positive grid values is the smallest (largest), the next value beyond it on the
    grid's outer log spacing is added and the new combinations are run; at most
    ``extend`` rounds.

    Args:
        problem: The training problem.
        method: A training method (:data:`TRAIN_METHODS`).
        grid: Hyperparameter name -> values (e.g. ``{"lr": [0.01, 0.1], "damping": [1e-3]}``).
        steps, batch_size, seed: As in :func:`train`.
        fixed: Further hyperparameters held fixed.
        extend: Rounds of edge extension (0: the grid as given).
        score_steps: Step budget of the score (``None``: the end of the run).

    Returns:
        The best hyperparameters (``grid`` entries only) and records of section ``"grid"``:
        ``metric="final_train_loss"`` per combination (the score), its hyperparameters in
        ``extra`` and ``extra["round"]``, the extension round that ran it (0 = the grid as
        given); the best combination's record has ``extra["best"] = True``.
    """
    check_train_methods([method])
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise OptionError("grid must name at least one hyperparameter, each with values")
    if score_steps is not None and not 1 <= score_steps <= steps:
        raise OptionError(f"score_steps must lie in 1..steps={steps}, got {score_steps!r}")
    names = list(grid)
    values = {k: list(dict.fromkeys(v)) for k, v in grid.items()}
    window = max(1, (score_steps or steps) // 10)
    scores: dict[tuple, float] = {}
    records: list[Record] = []
    for round_ in range(extend + 1):
        combos = [c for c in itertools.product(*(values[k] for k in names)) if c not in scores]
        for combo in tqdm(combos, desc=f"grid {method}", disable=not progress, leave=False):
            hp = dict(zip(names, combo))
            make = stepper(method, problem.loss_fn, **{**(fixed or {}), **hp})
            found = train(problem, {method: make}, steps, batch_size, seed, progress=False)
            if score_steps is None:
                score = final_loss(found, method, window)
            else:
                score = budget_losses(found, method, [score_steps], window)[score_steps]
                score = math.inf if math.isnan(score) else score
            scores[combo] = score
            records.append(
                Record("grid", "final_train_loss", method, score, extra={**hp, "round": round_})
            )
        best = min(scores, key=lambda c: scores[c])
        if round_ == extend or not _extend_at_edges(values, names, best):
            break
    best = min(scores, key=lambda c: scores[c])
    best_hp = dict(zip(names, best))
    records = [
        dataclasses.replace(r, extra={**r.extra, "best": True})
        if all(r.extra[k] == v for k, v in best_hp.items())
        else r
        for r in records
    ]
    return best_hp, records


def _extend_at_edges(values: dict[str, list[Any]], names: Sequence[str], best: tuple) -> bool:
    """Add one value beyond each grid edge the ``best`` combination sits on (log spacing of
    the two outermost values); ``True`` when anything was added."""
    grew = False
    for name, v in zip(names, best):
        grid = values[name]
        numeric = [x for x in grid if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(numeric) < 2 or len(numeric) != len(grid) or min(numeric) <= 0:
            continue
        ordered = sorted(numeric)
        if v == ordered[-1]:
            grid.append(ordered[-1] * ordered[-1] / ordered[-2])
            grew = True
        elif v == ordered[0]:
            grid.append(ordered[0] * ordered[0] / ordered[1])
            grew = True
    return grew

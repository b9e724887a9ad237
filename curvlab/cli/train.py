"""``curvlab train``: training trajectories of several methods, written as a report.

Every method starts from the same initial model and sees the same mini-batches
(:func:`curvlab.train.train`); along the trajectory of one method (``--diagnose``)
each diagnosed step also records the compare metrics on its mini-batch.  The report
has the training and test curves, the per-step wall-clock time and the diagnostics
(rendered by :mod:`curvlab.report.training`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlab.cli.common import (
    DTYPES,
    POOL,
    UsageError,
    add_plugin_option,
    check_problem,
    device,
    load_model,
    load_plugins,
    names,
    optional,
    run_and_report,
)
from curvlab.compare.methods import check_methods
from curvlab.data import BUILTIN_DATASETS, DATASETS, load_dataset
from curvlab.models import MODELS
from curvlab.records import Record
from curvlab.report.training import train_figures, train_narrative
from curvlab.train import (
    TRAIN_METHODS,
    Diagnostics,
    Problem,
    check_train_methods,
    stepper,
    train,
)

DEFAULT_TRAIN_METHODS = ("sgd", "exact", "kfac", "foof")
HPARAMS = ("lr", "damping")
"""Hyperparameters settable per method on the command line."""


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``train`` subcommand."""
    help_text = "train several methods from the same start and report their trajectories"
    p = sub.add_parser("train", help=help_text, description=help_text)
    g = p.add_argument_group("problem")
    g.add_argument(
        "--model",
        default="mlp",
        help=f"built-in ({', '.join(MODELS)}) or package.module:function [default: mlp]",
    )
    g.add_argument("--data", default="digits", help=f"{', '.join(DATASETS)} [default: digits]")
    g.add_argument(
        "--data-root", default=None, help="data folder [default: $CURVLAB_DATA or ./data]"
    )
    g.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"training examples used [default: all for built-in data, {POOL} for file datasets]",
    )
    g.add_argument("--seed", type=int, default=0, help="model init and batch order [default: 0]")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [default: cpu]")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES), help="[default: float32]")
    t = p.add_argument_group("training")
    t.add_argument(
        "--methods",
        default=",".join(DEFAULT_TRAIN_METHODS),
        help=f"comma-separated from {', '.join(TRAIN_METHODS)} ('exact' = exact natural "
        f"gradient) [default: {','.join(DEFAULT_TRAIN_METHODS)}]",
    )
    t.add_argument("--steps", type=int, default=100, help="updates per method [default: 100]")
    t.add_argument("--batch-size", type=int, default=128, help="mini-batch size [default: 128]")
    for name in HPARAMS:
        t.add_argument(
            f"--{name}",
            default=None,
            help=f"{name}: one value for every method or per method, e.g. "
            f"'sgd=0.3,kfac=0.1' [default: each method's own, see 'curvlab list']",
        )
    t.add_argument("--eval-every", type=int, default=10, help="test-set evaluation period [10]")
    t.add_argument(
        "--diagnose",
        default=None,
        help="method whose trajectory gets per-step compare diagnostics (cosine to the "
        "exact natural gradient, progress per update); 'none' to skip [default: kfac when "
        "trained, else none]",
    )
    t.add_argument("--diagnose-every", type=int, default=10, help="diagnosis period [10]")
    t.add_argument(
        "--diagnose-methods",
        default="kfac,foof,blockdiag,sgd",
        help="compare methods measured at each diagnosed step [default: %(default)s]",
    )
    t.add_argument(
        "--diagnose-damping", type=float, default=1e-3, help="λ of the diagnostics [1e-3]"
    )
    add_plugin_option(t)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="curvlab-train", help="report folder [./curvlab-train]")
    o.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    o.add_argument("--format", default="png,pdf", help="figure formats from png, pdf, svg")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def per_method(
    text: str | None, methods: Sequence[str], what: str, accepts: Sequence[str]
) -> dict[str, float]:
    """``--lr``/``--damping``: ``"0.1"`` (every method in ``accepts``) or per method,
    ``"sgd=0.3,kfac=0.1"``."""
    if text is None:
        return {}
    out: dict[str, float] = {}
    for item in names(text):
        method, _, value = item.rpartition("=")
        if method and method not in methods:
            raise UsageError(
                f"--{what} names '{method}', which is not among --methods ({', '.join(methods)})"
            )
        if method and method not in accepts:
            raise UsageError(f"--{what} names '{method}', which has no {what}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--{what} value '{value}' is not a number") from None
        if not number > 0:
            raise UsageError(f"--{what} must be > 0, got {value}")
        out.update(dict.fromkeys([method] if method else accepts, number))
    return out


def resolve_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the ``train`` options into the run configuration."""
    load_plugins(args.plugin)
    try:
        methods = check_train_methods(names(args.methods))
        diag_methods = check_methods(names(args.diagnose_methods))
    except ValueError as err:
        raise UsageError(str(err)) from None
    hparams: dict[str, dict[str, Any]] = {m: dict(TRAIN_METHODS[m].defaults) for m in methods}
    for what in HPARAMS:
        accepts = [m for m in methods if what in hparams[m]]
        for m, value in per_method(getattr(args, what), methods, what, accepts).items():
            hparams[m][what] = value
    if args.diagnose is None:
        follow = "kfac" if "kfac" in methods else None
    else:
        follow = optional(args.diagnose)
    if follow is not None and follow not in methods:
        raise UsageError(f"--diagnose '{follow}' is not among --methods ({', '.join(methods)})")
    formats = check_problem([args.model], args.data, names(args.format))
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--eval-every", args.eval_every),
        ("--diagnose-every", args.diagnose_every),
        ("--train-size", 1 if args.train_size is None else args.train_size),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be an integer >= 1, got {value}")
    if not args.diagnose_damping > 0:
        raise UsageError(f"--diagnose-damping must be > 0, got {args.diagnose_damping}")
    return {
        "command": "train",
        "models": [args.model],
        "data": args.data,
        "data_root": args.data_root,
        "train_size": args.train_size,
        "seed": args.seed,
        "device": str(device(args.device)),
        "dtype": args.dtype,
        "loss": "CrossEntropyLoss(reduction='mean')",
        "methods": methods,
        "hyperparameters": hparams,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "diagnose": follow,
        "diagnose_every": args.diagnose_every,
        "diagnose_methods": diag_methods,
        "diagnose_damping": args.diagnose_damping,
        "formats": formats,
    }


def load_problem(config: dict[str, Any]) -> Problem:
    """The training problem of a configuration (train and test splits, model factory)."""
    name, dtype, dev = config["data"], DTYPES[config["dtype"]], torch.device(config["device"])
    n = config["train_size"] or (None if name in BUILTIN_DATASETS else POOL)
    root = config["data_root"]
    try:
        train_set = load_dataset(name, "train", n=n, root=root, dtype=dtype)
        test_set = load_dataset(
            name, "test", n=None if name in BUILTIN_DATASETS else POOL, root=root, dtype=dtype
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    shape, classes = train_set.input_shape, train_set.num_classes

    def make_model() -> nn.Module:
        try:
            return load_model(config["models"][0], shape, classes, config)
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            raise UsageError(f"model '{config['models'][0]}': {err}") from None

    return Problem(
        make_model,
        nn.CrossEntropyLoss(),
        (train_set.inputs.to(dev), train_set.targets.to(dev)),
        (test_set.inputs.to(dev), test_set.targets.to(dev)),
    )


def run_train(config: dict[str, Any], progress: bool = True) -> list[Record]:
    """Train every configured method; the records of :func:`curvlab.train.train`."""
    problem = load_problem(config)
    methods = {
        m: stepper(m, problem.loss_fn, **config["hyperparameters"][m]) for m in config["methods"]
    }
    diagnostics = None
    if config["diagnose"] is not None:
        diagnostics = Diagnostics(
            config["diagnose"],
            every=config["diagnose_every"],
            methods=config["diagnose_methods"],
            damping=config["diagnose_damping"],
            # token outputs: the exact Fisher has a column per position and class
            fisher="mc" if config["data"] == "text" else "exact",
        )
    return train(
        problem,
        methods,
        config["steps"],
        config["batch_size"],
        seed=config["seed"],
        eval_every=config["eval_every"],
        diagnostics=diagnostics,
        progress=progress,
    )


def run_train_command(args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Run ``curvlab train`` and write its report; returns the exit code."""
    return run_and_report(args, config, run_train, train_figures, train_narrative)

"""``curvlab compare`` / ``spectra`` / ``damping`` / ``kfc``: options, checks and the run.

Each command compares methods on one batch for one or more models
(:func:`curvlab.compare.compare`) and writes a report whose figures and text come from
:mod:`curvlab.report.figures` and :mod:`curvlab.report.narrative`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

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
from curvlab.cli.trained import (
    PRETRAIN_METHODS,
    file_digest,
    load_weights,
    pretrain,
    read_state_dict,
)
from curvlab.compare.methods import DEFAULT_METHODS, METHODS, check_methods
from curvlab.compare.run import (
    DEFAULT_DAMPING,
    DEFAULT_LRS,
    SECTIONS,
    check_positive,
    check_sections,
    compare,
)
from curvlab.data import BUILTIN_DATASETS, DATASETS, Dataset, load_dataset
from curvlab.errors import OptionError
from curvlab.layers import layers_in_forward
from curvlab.losses import FISHER_TYPES
from curvlab.models import MODELS
from curvlab.records import Record
from curvlab.report.figures import report_figures
from curvlab.report.findings import findings_sections, findings_titles
from curvlab.report.narrative import narrative

COMMANDS = {
    # name: (help, sections, models, output folder)
    "compare": (
        "compare methods on every section (the default problem needs no options)",
        SECTIONS,
        "mlp,cnn-max,cnn-avg",
        "curvlab-report",
    ),
    "spectra": (
        "spectra and top-k eigenspace overlaps only",
        ("spectrum",),
        "mlp,cnn-max",
        "curvlab-spectra",
    ),
    "damping": (
        "damping sweeps only (heuristic vs standard, KFAC vs FOOF, cross terms, step sizes)",
        ("damping",),
        "mlp,cnn-max",
        "curvlab-damping",
    ),
    "kfc": (
        "KFC assumption checks for conv layers only (max- vs average-pooling CNNs)",
        ("kfc_check",),
        "cnn-max,cnn-avg",
        "curvlab-kfc",
    ),
}


def add_compare_options(
    p: argparse.ArgumentParser, sections: Sequence[str], models: str, out: str
) -> None:
    g = p.add_argument_group("problem")
    g.add_argument(
        "--model",
        default=models,
        help=f"comma-separated models: built-in ({', '.join(MODELS)}) or "
        "package.module:function returning an nn.Module (called without arguments) "
        f"[default: {models}]",
    )
    g.add_argument(
        "--data",
        default="digits",
        help=f"dataset: {', '.join(DATASETS)}; all but digits, mnist-5k and text (built in) are "
        "read from files you place under --data-root (MNIST/Fashion-MNIST IDX, CIFAR-10 "
        "python batches) [default: digits]",
    )
    g.add_argument(
        "--data-root", default=None, help="data folder [default: $CURVLAB_DATA or ./data]"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples in the batch [default: 128; 8 sequences for --data text]",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="model init, batch choice, MC labels [default: 0]"
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [default: cpu]")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES), help="[default: float32]")
    t = p.add_argument_group(
        "trained point (default: the freshly initialised model)",
    )
    t.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="load a saved state_dict (torch.save(model.state_dict(), PATH)) into the model "
        "(one --model only); keys and shapes must match",
    )
    t.add_argument(
        "--pretrain",
        type=int,
        default=0,
        metavar="STEPS",
        help="train this many mini-batch steps on the training split of --data before the "
        "diagnosis [default: 0]",
    )
    t.add_argument(
        "--pretrain-method",
        default="sgd",
        help=f"optimizer of --pretrain: {', '.join(PRETRAIN_METHODS)} [default: sgd]",
    )
    t.add_argument(
        "--pretrain-lr",
        type=float,
        default=None,
        help="learning rate of --pretrain [default: "
        + ", ".join(f"{k} {v[1]:g}" for k, v in PRETRAIN_METHODS.items())
        + "]",
    )
    t.add_argument(
        "--pretrain-batch-size",
        type=int,
        default=None,
        help="mini-batch size of --pretrain [default: --batch-size]",
    )
    c = p.add_argument_group("comparison")
    add_plugin_option(c)
    c.add_argument(
        "--fisher",
        default=None,
        choices=list(FISHER_TYPES),
        help="Fisher type of F and of every approximation [default: exact (= GGN); mc for "
        "--data text, whose exact Fisher has a column per position and class]",
    )
    c.add_argument("--mc-samples", type=int, default=1, help="labels per input for --fisher mc")
    c.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated from {', '.join(METHODS)} [default: {','.join(DEFAULT_METHODS)}]",
    )
    c.add_argument("--reference", default="exact", help="method compared against [default: exact]")
    c.add_argument(
        "--damping",
        default=",".join(f"{x:g}" for x in DEFAULT_DAMPING),
        help="comma-separated λ grid, each > 0 [default: %(default)s]",
    )
    c.add_argument(
        "--lr",
        default=",".join(f"{x:g}" for x in DEFAULT_LRS),
        help="learning-rate grid of the progress section [default: %(default)s]",
    )
    c.add_argument(
        "--rescale-to",
        default="kfac",
        help="progress also with steps rescaled per layer to this method's norms; "
        "'none' to skip [default: kfac]",
    )
    c.add_argument(
        "--inner",
        default="foof",
        help="methods whose curvature gives extra cosine inner products; 'none' for only "
        "Euclidean [default: foof]",
    )
    c.add_argument(
        "--sections",
        default=",".join(sections),
        help=f"comma-separated from {', '.join(SECTIONS)} [default: %(default)s]",
    )
    c.add_argument(
        "--top-k", type=int, default=10, help="eigenvectors in the overlap [default: 10]"
    )
    c.add_argument(
        "--max-eigenvalues",
        type=int,
        default=500,
        help="largest eigenvalues kept per spectrum, 0 for all [default: 500]",
    )
    c.add_argument(
        "--kfc-max-params",
        type=int,
        default=1536,
        help="largest conv block checked densely; bigger ones are subsampled [default: 1536]",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default=out, help=f"report folder [default: ./{out}]")
    o.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    o.add_argument(
        "--format",
        default="png,pdf",
        help="figure formats from png, pdf, svg; PNG and PDF are always written [default: png,pdf]",
    )
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the options into the run configuration (stored in results.json).

    Raises:
        UsageError: an invalid option, with the valid choices.
    """
    load_plugins(args.plugin)
    try:
        methods = check_methods([args.reference, *names(args.methods)])
        rescale = optional(args.rescale_to)
        if rescale is not None:
            check_methods([rescale])
        inner = [] if args.inner.lower() == "none" else names(args.inner)
        check_methods(inner)
        if "sgd" in inner:
            raise OptionError("'sgd' has no curvature for an inner product; choose another method")
        sections = check_sections(names(args.sections))
        damping = check_positive(names(args.damping), "damping")
        lrs = check_positive(names(args.lr), "learning rate")
    except ValueError as err:
        raise UsageError(str(err)) from None
    models = list(dict.fromkeys(names(args.model)))
    formats = check_problem(models, args.data, names(args.format))
    text = args.data == "text"
    batch_size = args.batch_size if args.batch_size is not None else 8 if text else 128
    fisher = args.fisher or ("mc" if text else "exact")
    for flag, value, low in (
        ("--batch-size", batch_size, 1),
        ("--mc-samples", args.mc_samples, 1),
        ("--top-k", args.top_k, 1),
        ("--max-eigenvalues", args.max_eigenvalues, 0),
        ("--kfc-max-params", args.kfc_max_params, 1),
    ):
        if value < low:
            raise UsageError(f"{flag} must be an integer >= {low}, got {value}")
    dev = device(args.device)
    return {
        "command": args.command,
        "models": models,
        "data": args.data,
        "data_root": args.data_root,
        "batch_size": batch_size,
        "seed": args.seed,
        "device": str(dev),
        "dtype": args.dtype,
        "loss": "CrossEntropyLoss(reduction='mean')",
        "fisher": fisher,
        "mc_samples": args.mc_samples,
        "methods": methods,
        "plugins": list(args.plugin),
        "reference": args.reference,
        "damping": list(damping),
        "headline_damping": damping[len(damping) // 2],
        "lrs": list(lrs),
        "rescale_to": rescale,
        "inner_products": inner,
        "sections": sections,
        "top_k": args.top_k,
        "max_eigenvalues": args.max_eigenvalues or None,
        "kfc_max_params": args.kfc_max_params,
        "formats": formats,
        **trained_config(args, models, batch_size),
    }


def trained_config(args: argparse.Namespace, models: list[str], batch_size: int) -> dict[str, Any]:
    """``weights`` (path and SHA-256 of the file, or ``None``) and ``pretrain`` (steps,
    method, lr, batch size, or ``None``) of the configuration; ``batch_size`` is the
    resolved ``--batch-size`` (the default of ``--pretrain-batch-size``).

    Raises:
        UsageError: ``--weights`` with several models or a missing file; a bad pretraining
            option.
    """
    weights = None
    if args.weights is not None:
        if len(models) != 1:
            raise UsageError(
                f"--weights fits one model, but --model names {len(models)} "
                f"({', '.join(models)}); run one model per --weights file"
            )
        path = Path(args.weights)
        read_state_dict(args.weights)  # a missing or unreadable file stops the run here
        weights = {"path": str(path.resolve()), "sha256": file_digest(path)}
    if args.pretrain < 0:
        raise UsageError(f"--pretrain must be an integer >= 0, got {args.pretrain}")
    if args.pretrain_method not in PRETRAIN_METHODS:
        raise UsageError(
            f"unknown --pretrain-method '{args.pretrain_method}'; choose from "
            f"{', '.join(PRETRAIN_METHODS)}"
        )
    lr = PRETRAIN_METHODS[args.pretrain_method][1] if args.pretrain_lr is None else args.pretrain_lr
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--pretrain-lr must be a finite number > 0, got {args.pretrain_lr}")
    batch = batch_size if args.pretrain_batch_size is None else args.pretrain_batch_size
    if batch < 1:
        raise UsageError(f"--pretrain-batch-size must be an integer >= 1, got {batch}")
    pretrain = None
    if args.pretrain > 0:
        pretrain = {
            "steps": args.pretrain,
            "method": args.pretrain_method,
            "lr": lr,
            "batch_size": batch,
        }
    return {"weights": weights, "pretrain": pretrain}


def compare_options(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`curvlab.compare.compare` for a configuration."""
    return {
        "methods": config["methods"],
        "fisher": config["fisher"],
        "damping": config["damping"],
        "reference": config["reference"],
        "sections": config["sections"],
        "inner_products": config["inner_products"],
        "mc_samples": config["mc_samples"],
        "seed": config["seed"],
        "lrs": config["lrs"],
        "rescale_to": config["rescale_to"],
        "top_k": config["top_k"],
        "max_eigenvalues": config["max_eigenvalues"],
        "kfc_max_params": config["kfc_max_params"],
    }


def load_pool(config: dict[str, Any]) -> Dataset:
    """The training split the batch is drawn from (and ``--pretrain`` trains on): all of a
    built-in dataset, the first :data:`POOL` examples of a file-based one."""
    name = config["data"]
    return load_dataset(
        name,
        "train",
        n=None if name in BUILTIN_DATASETS else POOL,
        root=config["data_root"],
        dtype=DTYPES[config["dtype"]],
    )


def load_batch(
    config: dict[str, Any], pool: Dataset | None = None
) -> tuple[Tensor, Tensor, tuple[int, ...], int]:
    """The batch: ``batch_size`` examples of the training split, chosen by a permutation
    seeded with ``seed`` (from the first :data:`POOL` examples of file-based datasets).

    Returns:
        Inputs and targets on the configured device/dtype, the input shape, the classes.
    """
    ds = load_pool(config) if pool is None else pool
    if config["batch_size"] > len(ds):
        raise UsageError(f"--batch-size {config['batch_size']} exceeds the {len(ds)} examples")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(config["seed"]))
    pick = order[: config["batch_size"]]
    device = torch.device(config["device"])
    return ds.inputs[pick].to(device), ds.targets[pick].to(device), ds.input_shape, ds.num_classes


def trained_model(
    spec: str, config: dict[str, Any], pool: Dataset, problem: dict[str, Any]
) -> nn.Module:
    """Model ``spec`` at the configured point: built (or imported), then ``--weights``
    loaded, then ``--pretrain`` steps taken; pretraining losses go into ``problem``."""
    try:
        model = load_model(spec, pool.input_shape, pool.num_classes, config)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise UsageError(f"model '{spec}': {err}") from None
    if config.get("weights") is not None:
        path = config["weights"]["path"]
        load_weights(model, read_state_dict(path), path, spec)
    if config.get("pretrain") is not None:
        device = torch.device(config["device"])
        problem["pretrain"] = pretrain(
            model,
            nn.CrossEntropyLoss(),
            pool.inputs.to(device),
            pool.targets.to(device),
            config,
        )
    return model


def run(config: dict[str, Any], progress: bool = True) -> list[Record]:
    """Run the comparison of every configured model; records carry ``extra["model"]``.

    Also stores, per model in ``config["problems"]``, the number of trainable parameters,
    the layers without Kronecker factors (whose exact block KFAC, EKFAC and FOOF use) and,
    with ``--pretrain``, the training loss over the first and last steps.
    """
    pool = load_pool(config)
    inputs, targets, _, _ = load_batch(config, pool)
    problems: dict[str, dict[str, Any]] = {spec: {} for spec in config["models"]}
    # diagnostics of the network as it predicts: running statistics, no dropout
    models = [(spec, trained_model(spec, config, pool, problems[spec]).eval()) for spec in problems]
    records: list[Record] = []
    for spec, model in tqdm(models, desc="models", disable=not progress or len(models) == 1):
        loss_fn = nn.CrossEntropyLoss()
        found = compare(
            model, loss_fn, inputs, targets, progress=progress, **compare_options(config)
        )
        records += [dataclasses.replace(r, extra={**r.extra, "model": spec}) for r in found]
        problems[spec] = {
            "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "exact_layers": [
                i.name
                for i in layers_in_forward(model, inputs)
                if not (i.kronecker or i.group_layouts)
            ],
            **problems[spec],
        }
    config["problems"] = problems
    return records


def run_compare_command(args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Run a comparison command and write its report; returns the exit code."""
    return run_and_report(
        args,
        config,
        run,
        lambda records: report_figures(records, config["headline_damping"], config["reference"]),
        narrative,
        findings_sections,
        findings_titles,
    )

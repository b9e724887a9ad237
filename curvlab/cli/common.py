"""Option parsing and checks shared by the ``curvlab`` subcommands."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from curvlab.data import DATASETS, CorruptDataError
from curvlab.errors import CurvlabError
from curvlab.methods import load_plugin
from curvlab.models import MODELS, build_model, load_user_model
from curvlab.records import Record
from curvlab.report.tables import Table
from curvlab.report.writer import REPORT_MARKERS, write_report

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMATS = ("png", "pdf", "svg")
POOL = 10_000
"""File-based datasets: batches are drawn from the first this many training examples."""


class UsageError(Exception):
    """An invalid option; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def add_plugin_option(group: argparse._ActionGroup) -> None:
    """``--plugin``: modules that register methods (:func:`curvlab.methods.load_plugin`)."""
    group.add_argument(
        "--plugin",
        action="append",
        default=[],
        help="register methods before the run: 'package.module' (registers on import) or "
        "'package.module:function' (called with no arguments); repeatable",
    )


def load_plugins(specs: Sequence[str]) -> None:
    """Load every ``--plugin`` (comma-separated lists allowed).

    Raises:
        UsageError: a plugin cannot be imported or called.
    """
    for text in specs:
        for spec in names(text):
            try:
                load_plugin(spec)
            except ValueError as err:
                raise UsageError(str(err)) from None


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def optional(name: str) -> str | None:
    """``None`` for ``"none"`` (any case), else ``name``."""
    return None if name.lower() == "none" else name


def device(text: str) -> torch.device:
    """The device named by ``--device``; CUDA only when available."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device '{text}'; choose from cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{text}' requested but CUDA is not available; choose cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            valid = ", ".join(["cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
            raise UsageError(f"device '{text}' does not exist; choose from {valid}")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device '{text}'; choose from cpu, cuda, cuda:N")
    return dev


def check_problem(models: list[str], data: str, formats: list[str]) -> list[str]:
    """Validate model specs, the dataset and figure formats; returns the formats to write
    (PNG and PDF always, then the requested ones)."""
    if not models:
        raise UsageError(f"no model given; choose from {', '.join(MODELS)}")
    for spec in models:
        if ":" not in spec and spec not in MODELS:
            raise UsageError(
                f"unknown model '{spec}'; choose from {', '.join(MODELS)} "
                "or package.module:function"
            )
    if data not in DATASETS:
        raise UsageError(f"unknown dataset '{data}'; choose from {', '.join(DATASETS)}")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise UsageError(f"unknown figure format '{bad[0]}'; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(["png", "pdf", *formats]))


def check_out(out: Path, force: bool) -> None:
    """Refuse to write into a folder that already holds a report unless ``force``."""
    existing = [m for m in REPORT_MARKERS if (out / m).exists()]
    if existing and not force:
        raise UsageError(
            f"{out} already holds a curvlab report ({existing[0]}); pass --force to overwrite "
            "it or choose another --out"
        )


def load_model(
    spec: str, input_shape: tuple[int, ...], num_classes: int, config: dict[str, Any]
) -> nn.Module:
    """A built-in model (seeded with ``seed``) or a user model, on the configured device/dtype."""
    if ":" in spec:
        model = load_user_model(spec)
    else:
        model = build_model(spec, input_shape, num_classes, seed=config["seed"])
    return model.to(torch.device(config["device"]), DTYPES[config["dtype"]])


def run_and_report(
    args: argparse.Namespace,
    config: dict[str, Any],
    run: Callable[[dict[str, Any], bool], list[Record]],
    figures: Callable[[Sequence[Record]], Mapping[str, Any]],
    narrative: Callable[[Sequence[Record], dict[str, Any]], Mapping[str, str]],
    tables: Callable[[Sequence[Record], dict[str, Any]], Mapping[str, Sequence[Table]]]
    | None = None,
    titles: Callable[[Sequence[Record], dict[str, Any]], Mapping[str, str]] | None = None,
) -> int:
    """Run a command's work and write its report into ``args.out``; the exit code.

    ``run(config, progress)`` returns the records; ``figures(records)`` and
    ``narrative(records, config)`` make the report's figures and text, ``tables(records,
    config)`` tables that replace those made from the records (e.g. the findings),
    ``titles(records, config)`` headings of sections (e.g. each model's findings).  Errors a user
    can fix (bad data, unsupported model, an existing report) become a
    :class:`UsageError`.  ``config["elapsed_seconds"]`` records the run's duration.
    """
    out = Path(args.out)
    check_out(out, args.force)
    start = time.perf_counter()
    try:
        records = run(config, not args.quiet)
    except (CurvlabError, FileNotFoundError, CorruptDataError, ImportError) as err:
        raise UsageError(str(err)) from None
    config["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    try:
        write_report(
            out,
            records,
            config,
            figures(records),
            narrative(records, config),
            formats=config["formats"],
            force=args.force,
            tables=None if tables is None else tables(records, config),
            titles=None if titles is None else titles(records, config),
        )
    except (FileExistsError, NotADirectoryError) as err:
        raise UsageError(str(err)) from None
    print(
        f"curvlab: wrote {out / 'report.html'} ({len(records)} records, "
        f"{time.perf_counter() - start:.0f} s)"
    )
    return 0

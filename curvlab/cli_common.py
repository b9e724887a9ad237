"""Option parsing and checks shared by the ``curvlab`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from curvlab.models import build_model, load_user_model
from curvlab.report.writer import REPORT_MARKERS

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

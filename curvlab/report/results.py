"""``results.json`` and ``results.csv``: the machine-readable side of a report.

``results.json`` holds::

    {"format": "curvlab-results", "version": 1,
     "timestamp": ISO 8601 (UTC), "seed": config["seed"], "device": config["device"],
     "config": {...}, "environment": {"python", "platform", "packages": {name: version},
     "cuda"}, "files": [paths written, relative to the report folder],
     "records": [Record.to_dict(), ...]}

Values JSON cannot hold (paths, numpy scalars, dtypes, ...) are written as
numbers or lists where possible and as strings otherwise; non-finite floats are
written as ``NaN`` / ``Infinity`` (read back by Python's json module).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvlab.errors import DataError
from curvlab.records import Record, from_dict, to_dataframe

RESULTS_FORMAT = "curvlab-results"
RESULTS_VERSION = 1

_PACKAGES = {
    "curvlab": "curvlab",
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "backpack": "backpack-for-pytorch",
    "curvlinops": "curvlinops-for-pytorch",
}
_OPTIONAL = ("backpack", "curvlinops")


def package_versions() -> dict[str, str]:
    """Versions of curvlab, torch, numpy, scipy, and of BackPACK / curvlinops when installed.

    Read from package metadata: nothing is imported.
    """
    versions = {}
    for name, distribution in _PACKAGES.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            if name not in _OPTIONAL:
                versions[name] = "unknown"
    return versions


def environment() -> dict[str, Any]:
    """Python, platform, package versions and the visible CUDA devices."""
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
        },
    }


def results_payload(
    config: Mapping[str, Any], records: Sequence[Record], files: Sequence[str]
) -> dict[str, Any]:
    """The content of ``results.json`` (see the module docstring)."""
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": config.get("seed"),
        "device": config.get("device"),
        "config": dict(config),
        "environment": environment(),
        "files": list(files),
        "records": [r.to_dict() for r in records],
    }


def to_json(payload: Any) -> str:
    """``payload`` as indented JSON text; see the module docstring for non-JSON values."""
    return json.dumps(payload, indent=2, default=_jsonable) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def records_csv(records: Sequence[Record]) -> str:
    """The records as CSV text, one row per record (``extra`` keys as columns)."""
    frame = to_dataframe(records)
    if frame.empty:
        frame = frame.reindex(columns=[f.name for f in fields(Record) if f.name != "extra"])
    return frame.to_csv(index=False)


def load_results(out_dir: str | os.PathLike) -> tuple[dict[str, Any], list[Record]]:
    """Read ``results.json`` of a report folder back.

    Returns:
        The run configuration and the records.

    Raises:
        FileNotFoundError: the folder holds no ``results.json``.
        ValueError: the file is not a curvlab results file.
    """
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no curvlab results at {path}")
    payload = read_payload(path)
    return payload["config"], [from_dict(row) for row in payload["records"]]


def read_payload(path: Path) -> dict[str, Any]:
    """The parsed ``results.json`` at ``path``, checked to be a curvlab results file."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != RESULTS_FORMAT:
        raise DataError(f"{path} is not a curvlab results file")
    if payload.get("version", 0) > RESULTS_VERSION:
        raise DataError(
            f"{path} has results format version {payload['version']}; this curvlab reads "
            f"up to {RESULTS_VERSION}. Upgrade curvlab."
        )
    return payload

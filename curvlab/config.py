"""Global, user-adjustable limits (memory budget, chunk size).

Change them in code (``curvlab.config.options.memory_budget = 8 * 2**30``) or with the
environment variables ``CURVLAB_MEMORY_BUDGET`` / ``CURVLAB_CHUNK_BYTES`` (bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from curvlab.errors import OptionError

GiB = 2**30
MiB = 2**20


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(float(raw))
    except ValueError as err:
        raise OptionError(f"{name}={raw!r} is not a number of bytes (e.g. 4e9)") from err


@dataclass
class Options:
    """Limits every curvature object respects.

    Attributes:
        memory_budget: Bytes one Gram matrix (with its factorisation) or one dense
            matrix may take; larger requests raise :class:`~curvlab.errors.MemoryBudgetError`.
        chunk_bytes: Bytes of temporaries per chunk when assembling Grams and
            per-sample quantities.
    """

    memory_budget: int = field(default_factory=lambda: _env_int("CURVLAB_MEMORY_BUDGET", 4 * GiB))
    chunk_bytes: int = field(default_factory=lambda: _env_int("CURVLAB_CHUNK_BYTES", 128 * MiB))


options = Options()


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``"3.0 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

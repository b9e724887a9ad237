"""Tidy result records: the one format that compare produces and reports/plots consume.

A record is one measured number: one method, one layer (or ``"network"``), one
damping value (or ``None``), one metric.  Lists of records convert to a pandas
DataFrame with :func:`to_dataframe` and to JSON-ready dicts with
:meth:`Record.to_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

NETWORK = "network"
"""Layer name used for whole-network quantities."""


@dataclass(frozen=True)
class Record:
    """One measured number.

    Attributes:
        section: Which analysis produced it, e.g. ``"cosine"``, ``"relative_error"``,
            ``"spectrum"``, ``"damping"``, ``"progress"``, ``"kfc_check"``, ``"train"``.
        metric: What was measured, e.g. ``"cosine"``, ``"cosine_A"``,
            ``"relative_frobenius_error"``, ``"eigenvalue"``.
        method: The curvature method the number belongs to (``"kfac"``, ``"exact"``, ...).
        value: The number.
        layer: Layer name, or :data:`NETWORK` for the whole network.
        reference: The method it is compared against, if any.
        damping: The damping λ used, if any.
        index: Position in a sequence (eigenvalue rank, training step, spatial offset).
        extra: Further labels (strings or numbers) that identify the row.
    """

    section: str
    metric: str
    method: str
    value: float
    layer: str = NETWORK
    reference: str | None = None
    damping: float | None = None
    index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict; ``extra`` keys become top-level columns."""
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


def to_dataframe(records: Iterable[Record]):
    """Records as a pandas DataFrame, one row per record (``extra`` flattened)."""
    import pandas as pd

    return pd.DataFrame([r.to_dict() for r in records])


def from_dict(row: dict[str, Any]) -> Record:
    """Inverse of :meth:`Record.to_dict` (unknown keys go to ``extra``)."""
    known = {"section", "metric", "method", "value", "layer", "reference", "damping", "index"}
    base = {k: row[k] for k in known if k in row}
    extra = {k: v for k, v in row.items() if k not in known}
    return Record(**base, extra=extra)

"""Turning records (or their DataFrame) into the rows one plot needs.

Every plotting function accepts a list of :class:`~curvlab.records.Record` or
the DataFrame of :func:`~curvlab.records.to_dataframe`.  Rows that share a
plotted key (e.g. several seeds) are averaged; rows that share a key but differ
in an identifying column the plot does not show (method, layer, reference,
damping) are refused with a message saying which argument picks one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from curvlab.errors import DataError, OptionError
from curvlab.records import NETWORK, Record, to_dataframe

Records = Iterable[Record] | pd.DataFrame
"""What plotting functions accept."""

_COLUMNS = ("section", "metric", "method", "value", "layer", "reference", "damping", "index")
_IDENTIFYING = ("method", "layer", "reference", "damping")


def frame(records: Records, caller: str) -> pd.DataFrame:
    """``records`` as a DataFrame with every :class:`Record` column (missing ones take the
    Record defaults); empty input is refused."""
    if isinstance(records, pd.DataFrame):
        df = records.copy()
    else:
        records = list(records)
        wrong = [type(r).__name__ for r in records if not isinstance(r, Record)]
        if wrong:
            raise TypeError(f"{caller}: expected Record objects or a DataFrame, got {wrong[0]}")
        df = to_dataframe(records)
    if df.empty:
        raise DataError(f"{caller}: no records to plot")
    missing = [c for c in ("section", "metric", "method", "value") if c not in df.columns]
    if missing:
        raise DataError(f"{caller}: the records lack the column(s) {', '.join(missing)}")
    for column in _COLUMNS:
        if column not in df.columns:
            df[column] = NETWORK if column == "layer" else None
    df["damping"] = pd.to_numeric(df["damping"])
    df["value"] = pd.to_numeric(df["value"])
    return df


def _choices(values: pd.Series) -> str:
    return ", ".join(repr(v) for v in dict.fromkeys(values.dropna()))


def select(
    records: Records,
    section: str,
    caller: str,
    *,
    metrics: Sequence[str] | None = None,
    method: str | None = None,
    layer: str | None = None,
    reference: str | None = None,
    damping: float | None = None,
) -> pd.DataFrame:
    """The rows of ``section``, optionally restricted to metrics, a method, a layer, a
    reference and a damping value (matched with ``np.isclose``).

    Raises:
        ValueError: nothing left, naming what the records do contain.
    """
    df = frame(records, caller)
    rows = df[df["section"] == section]
    if rows.empty:
        raise OptionError(
            f"{caller}: no records of section '{section}' (the records have sections "
            f"{_choices(df['section'])})"
        )
    if metrics is not None:
        kept = rows[rows["metric"].isin(metrics)]
        if kept.empty:
            raise OptionError(
                f"{caller}: no '{section}' records with metric {' or '.join(map(repr, metrics))}"
                f" (found {_choices(rows['metric'])})"
            )
        rows = kept
    for column, wanted in (("method", method), ("layer", layer), ("reference", reference)):
        if wanted is not None:
            kept = rows[rows[column] == wanted]
            if kept.empty:
                raise OptionError(
                    f"{caller}: no '{section}' records with {column}={wanted!r} "
                    f"(found {_choices(rows[column]) or 'none'})"
                )
            rows = kept
    if damping is not None:
        kept = rows[np.isclose(rows["damping"].astype(float), damping)]
        if kept.empty:
            raise OptionError(
                f"{caller}: no '{section}' records with damping={damping!r} "
                f"(found {_choices(rows['damping']) or 'none'})"
            )
        rows = kept
    return rows


def reduce(rows: pd.DataFrame, keys: Sequence[str], caller: str) -> pd.DataFrame:
    """Mean ``value`` per ``keys`` (in order of first appearance).

    Raises:
        ValueError: rows of one key differ in an identifying column that is not a key.
    """
    groups = rows.groupby(list(keys), dropna=False, sort=False)
    for column in _IDENTIFYING:
        if column in keys:
            continue
        counts = groups[column].nunique(dropna=True)
        if (counts > 1).any():
            raise OptionError(
                f"{caller}: the records mix several {column} values "
                f"({_choices(rows[column])}); pass {column}=... to plot one"
            )
    return groups["value"].mean().reset_index()

"""The paper style: fonts, sizes, a colour-blind-safe palette with a fixed colour per method.

Figures are created without pyplot (:class:`~matplotlib.figure.Figure` on an
Agg canvas), so they render headless, never pile up in pyplot's figure list,
and still display in Jupyter when returned from a cell.
"""

from __future__ import annotations

import functools
import io
import os
import secrets
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from curvlab.errors import OptionError

ONE_COLUMN = 3.25
"""Width in inches of one column of a two-column paper."""

TWO_COLUMN = 6.75
"""Width in inches of the full text width of a two-column paper."""

OKABE_ITO = (
    "#000000",  # black
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#F0E442",  # yellow
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
)
"""Okabe & Ito's colour-blind-safe palette."""

TOL_MUTED = (
    "#332288",  # indigo
    "#88CCEE",  # cyan
    "#44AA99",  # teal
    "#117733",  # green
    "#999933",  # olive
    "#DDCC77",  # sand
    "#CC6677",  # rose
    "#882255",  # wine
    "#AA4499",  # purple
)
"""Paul Tol's colour-blind-safe 'muted' palette, extending Okabe–Ito for more methods."""

PALETTE = OKABE_ITO + TOL_MUTED + ("#999999",)
"""Every colour the style uses."""

LINE_COLORS = tuple(c for c in PALETTE if c != "#F0E442")
"""The palette without yellow, which is too light for lines on white."""

METHOD_COLORS: dict[str, str] = {
    "exact": "#000000",
    "blockdiag": "#999999",
    "kfac": "#0072B2",
    "kfac-standard": "#332288",
    "kfac-heuristic": "#56B4E9",
    "foof": "#E69F00",
    "foof-kfac-damping": "#CC6677",
    "ekfac": "#009E73",
    "sgd": "#D55E00",
    "kfac-expand": "#CC79A7",
    "kfac-reduce": "#882255",
    "kfac-backpack": "#44AA99",
    "two-level-kfac": "#117733",
    "singd": "#AA4499",
}
"""Fixed colour of each known method, the same in every figure; also the legend order."""

UNKNOWN_METHOD_COLORS = ("#999933", "#88CCEE", "#DDCC77")
"""Palette colours no known method uses; unknown methods get one by a stable hash."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d")
"""Markers in the order of :data:`METHOD_COLORS`; unknown methods get one by hash."""

LINESTYLES = ("-", "--", ":", "-.")
"""Line styles that tell metrics apart when colour already encodes the method."""

STYLE: dict[str, Any] = {
    "font.family": "serif",
    "font.serif": ["DejaVu Serif", "STIXGeneral"],
    "mathtext.fontset": "dejavuserif",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.prop_cycle": cycler(color=list(LINE_COLORS)),
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "image.cmap": "viridis",
    "figure.dpi": 150,
    "savefig.dpi": 300,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}
"""matplotlib rcParams of the paper style (fonts ship with matplotlib: nothing is downloaded)."""

_F = TypeVar("_F", bound=Callable[..., Any])


def _normalise(method: str) -> str:
    return method.strip().lower().replace("_", "-")


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def method_color(method: str) -> str:
    """Hex colour of ``method``: fixed for known methods, a stable hash pick otherwise.

    Names are matched case-insensitively with ``_`` read as ``-``.  Two unknown
    methods may share a colour; :func:`method_marker` then usually tells them apart.
    """
    key = _normalise(method)
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return UNKNOWN_METHOD_COLORS[_stable_hash(key) % len(UNKNOWN_METHOD_COLORS)]


def method_marker(method: str) -> str:
    """Marker of ``method``, fixed like :func:`method_color`."""
    key = _normalise(method)
    known = list(METHOD_COLORS)
    if key in known:
        return MARKERS[known.index(key) % len(MARKERS)]
    return MARKERS[(_stable_hash(key) // 7) % len(MARKERS)]


def method_order(methods: Iterable[str]) -> list[str]:
    """Distinct ``methods`` with known ones first (in :data:`METHOD_COLORS` order), then
    unknown ones in order of appearance."""
    distinct = list(dict.fromkeys(methods))
    rank = {name: i for i, name in enumerate(METHOD_COLORS)}
    return sorted(distinct, key=lambda m: rank.get(_normalise(m), len(rank)))


def column_width(width: str | float) -> float:
    """``"one"`` -> :data:`ONE_COLUMN`, ``"two"`` -> :data:`TWO_COLUMN`, a number -> itself."""
    if width == "one":
        return ONE_COLUMN
    if width == "two":
        return TWO_COLUMN
    if isinstance(width, (int, float)) and width > 0:
        return float(width)
    raise OptionError(f"width must be 'one', 'two' or inches > 0, got {width!r}")


@contextmanager
def paper_style() -> Iterator[None]:
    """Apply :data:`STYLE` inside a ``with`` block (restores the previous rcParams)."""
    with mpl.rc_context(STYLE):
        yield


def apply_style() -> None:
    """Apply :data:`STYLE` globally (e.g. at the top of a notebook)."""
    mpl.rcParams.update(STYLE)


def styled(func: _F) -> _F:
    """Run a plotting function inside :func:`paper_style` (text takes its font on creation)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with paper_style():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    width: str | float = "one",
    height: float | None = None,
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure on an Agg canvas and its ``(nrows, ncols)`` array of axes.

    ``height`` defaults to 0.75 of the width per row of a one-column figure.
    """
    w = column_width(width)
    h = height if height is not None else nrows * min(w, ONE_COLUMN) * 0.75
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def shown_values(values: Iterable[float] | np.ndarray, log: bool = False) -> np.ndarray:
    """``values`` as floats with what an axis cannot show as NaN (matplotlib leaves NaN
    out): infinities, and on a logarithmic axis (``log``) values ``≤ 0`` too."""
    out = np.asarray(values, dtype=float).copy()
    keep = np.isfinite(out) & (out > 0) if log else np.isfinite(out)
    out[~keep] = np.nan
    return out


def log_scale(ax: Axes, axis: str, values: Iterable[float] | np.ndarray) -> bool:
    """A logarithmic ``axis`` (``"x"`` or ``"y"``) of ``ax`` when some of ``values`` is
    finite and positive; otherwise the axis stays linear.  Returns whether it is
    logarithmic."""
    if not np.isfinite(shown_values(values, log=True)).any():
        return False
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    return True


def legend(ax: Axes, handles: Sequence[Artist] | None = None, outside: bool = False) -> None:
    """A legend inside ``ax`` for up to four entries, else (or when ``outside``) one below
    the figure.

    ``handles`` default to the labelled artists of ``ax``.
    """
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= 4 and not outside:
        ax.legend(handles=handles, loc="best")
        return
    fig = ax.get_figure()
    columns = 3 if fig.get_figwidth() <= ONE_COLUMN + 0.1 else 5
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), columns))


def key_handles(entries: Sequence[tuple[str, dict[str, Any]]]) -> list[Line2D]:
    """Legend-only lines, one per ``(label, line properties)``: for legends that explain
    colour and line style separately instead of listing every combination."""
    return [Line2D([], [], label=label, **props) for label, props in entries]


def figure_bytes(fig: Figure, fmt: str, dpi: float | None = None) -> bytes:
    """``fig`` rendered in format ``fmt`` (``"png"``, ``"pdf"``, ``"svg"``, ...) with the
    paper style's resolution and a tight bounding box."""
    supported = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in supported:
        raise OptionError(f"unknown figure format '{fmt}'; choose from {', '.join(supported)}")
    buffer = io.BytesIO()
    with paper_style():
        fig.savefig(buffer, format=fmt, dpi=dpi or STYLE["savefig.dpi"], bbox_inches="tight")
    return buffer.getvalue()


def save_figure(
    fig: Figure,
    path_stem: str | os.PathLike,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: float | None = None,
) -> list[Path]:
    """Write ``fig`` as ``<path_stem>.<fmt>`` for each format, each file atomically.

    Every file is rendered in memory, written to a temporary file in the same
    folder and moved into place with :func:`os.replace`, so an existing file is
    either kept or fully replaced.  Parent folders are created.

    Returns:
        The written paths, in the order of ``formats``.
    """
    stem = Path(path_stem)
    rendered = [
        (stem.with_name(f"{stem.name}.{fmt}"), figure_bytes(fig, fmt, dpi)) for fmt in formats
    ]
    for path, data in rendered:
        write_atomic(path, data)
    return [path for path, _ in rendered]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temporary file and :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fit_title(ax: Axes, text: str | None = None) -> None:
    """Set ``ax``'s title (``text``, default: its current one) in the style's title size,
    wrapped at spaces so that no line is wider than the axes."""
    text = ax.get_title() if text is None else text
    with paper_style():
        ax.set_title(text, fontsize=STYLE["axes.titlesize"])
        fig = ax.get_figure()
        renderer = fig.canvas.get_renderer()
        fig.draw_without_rendering()
        limit = ax.get_window_extent(renderer).width
        words = text.split()
        lines: list[str] = []
        for word in words:
            trial = f"{lines[-1]} {word}" if lines else word
            ax.set_title(trial)
            if lines and ax.title.get_window_extent(renderer).width > limit:
                lines.append(word)
            elif lines:
                lines[-1] = trial
            else:
                lines.append(word)
        ax.set_title("\n".join(lines))


def fit_titles(fig: Figure) -> Figure:
    """:func:`fit_title` on every titled axes of ``fig``; returns ``fig``."""
    for ax in fig.axes:
        if ax.get_title():
            fit_title(ax)
    return fig


def dodge(x: np.ndarray, k: int, n: int, decades: float = 0.015) -> np.ndarray:
    """``x`` (on a log axis) shifted for series ``k`` of ``n`` by a small factor, so that
    equal values of different series stay visible side by side."""
    return np.asarray(x, dtype=float) * 10.0 ** (decades * (k - (n - 1) / 2))


def coinciding(series: dict[str, np.ndarray], rtol: float = 1e-2) -> dict[str, list[str]]:
    """For each series, the earlier series it would hide: the same length, values missing
    (NaN, infinite) at the same places and every other value within ``rtol`` of the
    other's (relative to the largest spread of finite values)."""
    items = [(name, np.asarray(v, dtype=float)) for name, v in series.items()]
    finite = [v[np.isfinite(v)] for _, v in items]
    spread = max((np.ptp(v) for v in finite if len(v)), default=0.0) or 1.0
    out: dict[str, list[str]] = {}
    for i, (name, values) in enumerate(items):
        for other, ref in items[:i]:
            if len(values) != len(ref) or not np.isfinite(values).any():
                continue
            same_gaps = np.array_equal(np.isfinite(values), np.isfinite(ref))
            both = np.isfinite(values) & np.isfinite(ref)
            if same_gaps and np.max(np.abs(values[both] - ref[both])) <= rtol * spread:
                out.setdefault(name, []).append(other)
    return out


def coincidence_label(name: str, hidden: dict[str, list[str]]) -> str:
    """``name`` with a note of the series it coincides with, e.g. ``"ekfac (≈ kfac)"``."""
    return f"{name} (≈ {', '.join(hidden[name])})" if name in hidden else name

"""Publication figures rendered from records, in one paper style.

Every ``plot_*`` function takes a list of :class:`~curvlab.records.Record` (or
the DataFrame of :func:`~curvlab.records.to_dataframe`) and returns a
matplotlib :class:`~matplotlib.figure.Figure`; none of them computes curvature.
Save figures with :func:`save_figure`.
"""

from curvlab.plots.cosine import plot_cosine_heatmap
from curvlab.plots.damping import plot_damping_sweep
from curvlab.plots.error_split import plot_error_split
from curvlab.plots.kfc import plot_kfc_checks
from curvlab.plots.layer_errors import plot_layer_errors
from curvlab.plots.progress import plot_progress, plot_step_progress
from curvlab.plots.spectra import plot_spectra
from curvlab.plots.style import (
    METHOD_COLORS,
    ONE_COLUMN,
    TWO_COLUMN,
    apply_style,
    method_color,
    method_marker,
    paper_style,
    save_figure,
)
from curvlab.plots.training import plot_training

__all__ = [
    "METHOD_COLORS",
    "ONE_COLUMN",
    "TWO_COLUMN",
    "apply_style",
    "method_color",
    "method_marker",
    "paper_style",
    "plot_cosine_heatmap",
    "plot_damping_sweep",
    "plot_error_split",
    "plot_kfc_checks",
    "plot_layer_errors",
    "plot_progress",
    "plot_spectra",
    "plot_step_progress",
    "plot_training",
    "save_figure",
]

"""Compare curvature approximations with the exact Fisher/GGN on one batch.

:func:`compare` returns tidy :class:`~curvlab.records.Record` rows (one per method,
layer, damping and metric) for the sections in :data:`SECTIONS`; the functions it is
made of (``cosine_records``, ``relative_errors``, ``spectrum_records``, ...) work on an
:class:`Analysis`, which holds the one capture and caches what the sections share.

The package itself is callable: ``curvlab.compare(model, loss_fn, X, y, ...)`` is
:func:`compare`, while ``curvlab.compare.<module>`` stays importable.
"""

import sys
import types

from curvlab.compare.analysis import Analysis
from curvlab.compare.cosine import cosine, cosine_matrix, cosine_records
from curvlab.compare.damping import damping_records
from curvlab.compare.divergence import kl_divergences, kl_records
from curvlab.compare.eigen_split import error_split, error_split_records
from curvlab.compare.errors import relative_error_records, relative_errors
from curvlab.compare.kfc_checks import (
    kfc_check_records,
    kfc_errors,
    kfc_matrices,
    spatial_correlation,
)
from curvlab.compare.methods import DEFAULT_METHODS, METHODS, Method
from curvlab.compare.progress import loss_at, progress_records
from curvlab.compare.run import DEFAULT_DAMPING, DEFAULT_LRS, SECTIONS, compare
from curvlab.compare.spectra import (
    nonzero_spectrum,
    overlap_records,
    spectrum_records,
    top_eigenvectors,
)
from curvlab.compare.step_progress import step_progress, step_progress_summary


class _CallablePackage(types.ModuleType):
    """This package's module type: calling the package calls :func:`compare`."""

    def __call__(self, *args, **kwargs):
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = [
    "Analysis",
    "DEFAULT_DAMPING",
    "DEFAULT_LRS",
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "SECTIONS",
    "compare",
    "cosine",
    "cosine_matrix",
    "cosine_records",
    "damping_records",
    "error_split",
    "error_split_records",
    "kl_divergences",
    "kl_records",
    "kfc_check_records",
    "kfc_errors",
    "kfc_matrices",
    "loss_at",
    "nonzero_spectrum",
    "overlap_records",
    "progress_records",
    "relative_error_records",
    "relative_errors",
    "spatial_correlation",
    "spectrum_records",
    "step_progress",
    "step_progress_summary",
    "top_eigenvectors",
]

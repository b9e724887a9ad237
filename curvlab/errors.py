"""Exceptions raised by curvlab, each naming the problem and the way out."""

from __future__ import annotations


class CurvlabError(Exception):
    """Base class of every error curvlab raises on purpose."""


class UnsupportedModelError(CurvlabError, TypeError):
    """A module with trainable parameters that curvlab cannot handle (or an unsupported loss)."""


class ShapeError(CurvlabError, ValueError):
    """Inputs, targets or vectors of the wrong shape."""


class NonFiniteError(CurvlabError, ValueError):
    """NaN or Inf in inputs, outputs, captured quantities or vectors."""


class SingularMatrixError(CurvlabError, ValueError):
    """A solve with damping ≤ 0 on a singular (or numerically singular) matrix."""


class MemoryBudgetError(CurvlabError, MemoryError):
    """An object (Gram matrix, dense matrix) would exceed the configured memory budget."""


class ConvergenceError(CurvlabError, ArithmeticError):
    """An iterative computation (e.g. KFOC's power iteration) did not reach its tolerance."""


class OptionError(CurvlabError, ValueError):
    """An argument or option value outside its valid choices (the message names them)."""


class DataError(CurvlabError, ValueError):
    """Records, results files or datasets that do not hold what the caller needs."""


class SampleCouplingError(CurvlabError, ValueError):
    """Samples that the forward pass couples (batch statistics, modules mixing the batch)
    or a random forward pass, where a computation needs independent, repeatable samples."""

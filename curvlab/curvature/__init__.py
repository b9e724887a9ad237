"""Curvature objects, all built from a :class:`~curvlab.capture.Capture`."""

from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.ekfac import EKFAC
from curvlab.curvature.exact import BlockDiagFisher, ExactFisher, GramFisher
from curvlab.curvature.foof import FOOF
from curvlab.curvature.kfac import KFAC

__all__ = [
    "Curvature",
    "LayerwiseCurvature",
    "ExactFisher",
    "GramFisher",
    "BlockDiagFisher",
    "KFAC",
    "FOOF",
    "EKFAC",
]

"""Curvature objects, all built from a :class:`~curvlab.capture.Capture`."""

from curvlab.curvature.base import Curvature, LayerwiseCurvature
from curvlab.curvature.diagonal import DiagEmpiricalFisher, DiagFisher
from curvlab.curvature.ekfac import EKFAC
from curvlab.curvature.exact import BlockDiagFisher, ExactFisher, GramFisher
from curvlab.curvature.foof import FOOF
from curvlab.curvature.kfac import KFAC
from curvlab.curvature.kfoc import KFOC
from curvlab.curvature.shampoo import Shampoo

__all__ = [
    "Curvature",
    "LayerwiseCurvature",
    "ExactFisher",
    "GramFisher",
    "BlockDiagFisher",
    "KFAC",
    "FOOF",
    "EKFAC",
    "KFOC",
    "Shampoo",
    "DiagFisher",
    "DiagEmpiricalFisher",
]

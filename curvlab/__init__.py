"""curvlab: curvature diagnostics for neural networks.

One :func:`capture` (one forward, one batched backward) feeds every curvature object:
:class:`ExactFisher` and :class:`BlockDiagFisher` (Woodbury, exact), :class:`KFAC`,
:class:`FOOF`, :class:`EKFAC`, :class:`KFOC`, :class:`Shampoo` and the diagonals
:class:`DiagFisher` and :class:`DiagEmpiricalFisher`; :func:`register_method` adds
approximations of your own.  ``curvlab.compare(...)`` compares them with the
exact Fisher; :mod:`curvlab.optim` holds optimizers built on them.  See DESIGN.md for
the conventions.
"""

from curvlab import compare, config
from curvlab.capture import Capture, LayerCapture, capture
from curvlab.curvature import (
    EKFAC,
    FOOF,
    KFAC,
    KFOC,
    BlockDiagFisher,
    Curvature,
    DiagEmpiricalFisher,
    DiagFisher,
    ExactFisher,
    Shampoo,
)
from curvlab.methods import register_method

__version__ = "0.1.0"

__all__ = [
    "config",
    "compare",
    "capture",
    "Capture",
    "LayerCapture",
    "Curvature",
    "ExactFisher",
    "BlockDiagFisher",
    "KFAC",
    "FOOF",
    "EKFAC",
    "KFOC",
    "Shampoo",
    "DiagFisher",
    "DiagEmpiricalFisher",
    "register_method",
]

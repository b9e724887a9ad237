"""Optimizers built on curvlab's captures and curvature blocks (``torch.optim`` API).

Each takes ``(model, loss_fn, ...)`` and steps with a batch instead of a closure,
``loss = opt.step(inputs, targets)``, updating ``p.data`` in place
(:mod:`curvlab.optim.base`):

* :class:`NaturalGradient`: exact subsampled natural gradient (Woodbury), full or
  block-diagonal, optionally with the Fisher from an independent batch;
* :class:`KFAC`, :class:`FOOF`: moving-average, amortised Kronecker preconditioners
  built from the same blocks as :class:`curvlab.KFAC` and :class:`curvlab.FOOF`;
* :class:`TwoLevelKFAC`: KFAC plus the coarse-space correction (one unknown per layer);
* :class:`SINGD`: inverse-free structured factors with the IKFAC or INGD rule.
"""

from curvlab.optim.amortisation import Amortisation
from curvlab.optim.base import CurvatureOptimizer
from curvlab.optim.coarse import exact_coarse_fisher, kfac_coarse_fisher
from curvlab.optim.foof import FOOF
from curvlab.optim.kfac import KFAC
from curvlab.optim.natural_gradient import NaturalGradient
from curvlab.optim.singd import SINGD
from curvlab.optim.structures import BlockDiagonal, Dense, Diagonal, Hierarchical, Structure
from curvlab.optim.two_level import TwoLevelKFAC

__all__ = [
    "Amortisation",
    "CurvatureOptimizer",
    "NaturalGradient",
    "KFAC",
    "FOOF",
    "TwoLevelKFAC",
    "SINGD",
    "Structure",
    "Dense",
    "Diagonal",
    "BlockDiagonal",
    "Hierarchical",
    "exact_coarse_fisher",
    "kfac_coarse_fisher",
]

"""Layer kinds: one class per kind of trainable module (:mod:`curvlab.layers.base`)."""

from curvlab.layers.base import LayerKind, MatrixKind, PerSampleKind
from curvlab.layers.discovery import KINDS, find_layers, kind_of

__all__ = ["KINDS", "LayerKind", "MatrixKind", "PerSampleKind", "find_layers", "kind_of"]

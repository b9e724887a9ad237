"""Layer kinds: one class per kind of trainable module (:mod:`curvlab.layers.base`)."""

from curvlab.layers.base import LayerKind, MatrixKind, ModuleCall, ModuleKind, PerSampleKind
from curvlab.layers.discovery import (
    KINDS,
    find_layers,
    kind_of,
    layers_in_forward,
    module_kinds,
    share_repeated,
)
from curvlab.layers.shared import SharedKind

__all__ = [
    "KINDS",
    "LayerKind",
    "MatrixKind",
    "ModuleCall",
    "ModuleKind",
    "PerSampleKind",
    "SharedKind",
    "find_layers",
    "kind_of",
    "layers_in_forward",
    "module_kinds",
    "share_repeated",
]

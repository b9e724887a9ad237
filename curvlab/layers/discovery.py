"""Which kind each trainable module of a model is, in flat-layout order.

A module of a registered type gets that type's kind; a subclass of one only when it
computes what the kind assumes (it overrides neither ``forward`` nor the functional
core, and its trainable tensors are its plain ``weight``/``bias``, or for
``nn.MultiheadAttention`` its projections and ``bias_k``/``bias_v``; a kind may read one
module as several layers, :meth:`~curvlab.layers.base.LayerKind.layers`).  Everything else
with trainable parameters — custom modules, raw ``nn.Parameter``s, parametrised layers
(``torch.nn.utils.parametrize``, ``weight_norm``, ``spectral_norm``), a matrix layer
whose weight is frozen but whose bias trains — takes the exact generic path
(:class:`~curvlab.layers.generic.GenericKind`).  Convolutions with ``groups > 1`` take
:class:`~curvlab.layers.conv.GroupedConvKind`.  Parameters that several modules use
(tied weights), and the parameters of a module the forward pass calls more than once,
are read through all their calls (:class:`~curvlab.layers.shared.SharedKind`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from curvlab.errors import UnsupportedModelError
from curvlab.layers.attention import AttentionKind
from curvlab.layers.base import LayerKind, MatrixKind, ModuleKind
from curvlab.layers.conv import ConvKind, GroupedConvKind
from curvlab.layers.elementwise import (
    BatchNormKind,
    GroupNormKind,
    LayerNormKind,
    PReLUKind,
    RMSNormKind,
)
from curvlab.layers.embedding import EmbeddingKind
from curvlab.layers.generic import GenericKind
from curvlab.layers.linear import LinearKind
from curvlab.layers.shared import SharedKind

KINDS: dict[type[nn.Module], type[ModuleKind]] = {
    nn.Linear: LinearKind,
    nn.Embedding: EmbeddingKind,
    nn.Conv1d: ConvKind,
    nn.Conv2d: ConvKind,
    nn.Conv3d: ConvKind,
    nn.ConvTranspose1d: ConvKind,
    nn.ConvTranspose2d: ConvKind,
    nn.ConvTranspose3d: ConvKind,
    nn.BatchNorm1d: BatchNormKind,
    nn.BatchNorm2d: BatchNormKind,
    nn.BatchNorm3d: BatchNormKind,
    nn.GroupNorm: GroupNormKind,
    nn.LayerNorm: LayerNormKind,
    nn.RMSNorm: RMSNormKind,
    nn.PReLU: PReLUKind,
    nn.MultiheadAttention: AttentionKind,
}
"""Module type -> its kind; modules of other types take :class:`GenericKind`."""

# methods a subclass must not override to keep its parent's computation
_CORE_METHODS = ("forward", "_conv_forward")

# the trainable tensors a kind reads (with those of submodules it owns); default weight/bias
_PARAMETERS: dict[type[nn.Module], set[str]] = {
    nn.MultiheadAttention: {
        "in_proj_weight",
        "in_proj_bias",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "bias_k",
        "bias_v",
        "out_proj.weight",
        "out_proj.bias",
    }
}


def kind_of(module: nn.Module) -> type[ModuleKind]:
    """The kind class for ``module`` (:data:`KINDS`, else :class:`GenericKind`)."""
    if parametrize.is_parametrized(module):
        return GenericKind
    base = next((t for t in type(module).__mro__ if t in KINDS), None)
    if base is None or not _keeps_computation(module, base):
        return GenericKind
    if KINDS[base] is ConvKind and module.groups != 1:
        return GroupedConvKind
    return KINDS[base]


def _keeps_computation(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` computes what ``base`` does with its plain parameters
    (``weight``/``bias``, or those :data:`_PARAMETERS` names)."""
    cls = type(module)
    if any(getattr(cls, m, None) is not getattr(base, m, None) for m in _CORE_METHODS):
        return False
    if module._forward_pre_hooks:  # e.g. the hooks of the old weight_norm/spectral_norm
        return False
    owns = KINDS[base].owns_submodules
    names = {n for n, p in module.named_parameters(recurse=owns) if p.requires_grad}
    if not names <= _PARAMETERS.get(base, {"weight", "bias"}):
        return False
    # the matrix kinds read weight and bias as one [W | b]: a trainable bias needs its weight
    return not issubclass(KINDS[base], MatrixKind) or "weight" in names


def find_layers(model: nn.Module) -> list[LayerKind]:
    """The trainable parameters of ``model`` as layers (kinds) in flat-layout order.

    A module whose parameters no other module uses is one layer of its kind.  Parameters
    that several modules use (tied weights) form :class:`SharedKind` layers: each takes
    the parameters that ``model.parameters()`` lists under one module (those it
    registers first) and reads every module using them.  A module called more than once
    per forward pass is found by the capture (:func:`share_repeated`).

    Raises:
        UnsupportedModelError: a changed ``nn.MultiheadAttention`` with trainable
            parameters, no trainable parameter at all, or a registration order that
            differs from ``model.parameters()``.
    """
    kinds = module_kinds(model)
    users: dict[int, int] = {}
    for info in kinds:
        for p in info.params:
            users[id(p)] = users.get(id(p), 0) + 1
    layers: list[LayerKind] = []
    offset = 0
    owned: set[int] = set()
    for info in kinds:
        if all(users[id(p)] == 1 for p in info.params):
            info.offset = offset
            layer: LayerKind = info
        else:
            mine = [p for p in info.params if id(p) not in owned]
            if not mine:
                continue
            ids = {id(p) for p in mine}
            uses = [k for k in kinds if any(id(p) in ids for p in k.params)]
            layer = SharedKind(info.name, info.module, offset, mine, uses)
        owned.update(id(p) for p in layer.params)
        layers.append(layer)
        offset += layer.num_params
    if not layers:
        raise UnsupportedModelError("the model has no trainable parameter to analyse.")
    _check_parameter_order(model, layers)
    return layers


def module_kinds(model: nn.Module) -> list[ModuleKind]:
    """Every module of ``model`` with trainable parameters as its kind, in registration
    order (offsets 0: :func:`find_layers` lays them out)."""
    kinds: list[ModuleKind] = []
    covered: list[str] = []  # prefixes of submodules whose parameters a kind already owns
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        label = f"module '{name or '<root>'}' ({type(module).__name__})"
        kind_cls = kind_of(module)
        if isinstance(module, nn.MultiheadAttention) and kind_cls is not AttentionKind:
            if any(p.requires_grad for p in module.parameters()):
                raise UnsupportedModelError(
                    f"{label} changes nn.MultiheadAttention (its own forward, hooks, "
                    "parametrisations or other trainable tensors), whose parameters "
                    "(out_proj included) are used inside F.multi_head_attention_forward; "
                    "curvlab reads only the plain module. Use nn.MultiheadAttention itself "
                    "or freeze it."
                )
            covered.append(f"{name}." if name else "")
            continue
        if kind_cls.owns_submodules:
            covered.append(f"{name}." if name else "")
        elif parametrize.is_parametrized(module):
            covered.append(f"{name}.parametrizations." if name else "parametrizations.")
        kinds.extend(info for info in kind_cls.layers(name, module, 0) if info.params)
    return kinds


def share_repeated(layers: list[LayerKind], calls: Mapping[str, int]) -> list[LayerKind]:
    """``layers`` with every single-module layer whose module was called more than once
    (``calls``: module name -> calls in the forward pass) read as a :class:`SharedKind`
    of those calls (same parameters, same flat-layout slice), unless its kind reads the
    calls as more locations (``calls_as_locations``: Linear, Embedding)."""
    return [
        SharedKind(info.name, info.module, info.offset, info.params, [info])
        if isinstance(info, ModuleKind)
        and not info.calls_as_locations
        and calls.get(info.name, 0) > 1
        else info
        for info in layers
    ]


def layers_in_forward(model: nn.Module, inputs: Tensor) -> list[LayerKind]:
    """:func:`find_layers` with the modules that ``model(inputs)`` calls more than once
    read as shared layers, as :func:`curvlab.capture` reads them (one forward pass
    without autograd; buffers such as BatchNorm running statistics restored)."""
    layers = find_layers(model)
    calls: dict[str, int] = {}

    def counter(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1

        return hook

    uses = {use.name: use for info in layers for use in info.uses}
    handles = [use.module.register_forward_pre_hook(counter(name)) for name, use in uses.items()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return share_repeated(layers, calls)


def _check_parameter_order(model: nn.Module, layers: list[LayerKind]) -> None:
    """Ensure the layer-wise layout equals ``model.parameters()`` order (DESIGN.md)."""
    ours = [id(p) for info in layers for p in info.params]
    theirs = [id(p) for p in model.parameters() if p.requires_grad]
    if ours != theirs:
        raise UnsupportedModelError(
            "the model registers its trainable parameters in an order that does not follow "
            "its modules (each module's own parameters together); curvlab's flat vector "
            "layout would not match model.parameters(). Register parameters in submodules "
            "that own them."
        )

"""The one backend: one forward pass and one batched backward, recorded per layer.

:func:`capture` is the only code in curvlab that touches autograd hooks.  Every
curvature object is built from the :class:`Capture` it returns and never runs the
model again.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from curvlab.errors import OptionError, ShapeError, UnsupportedModelError
from curvlab.independence import sample_coupling
from curvlab.layers import LayerKind, ModuleCall, ModuleKind, find_layers, share_repeated
from curvlab.layers.base import LocationProducts
from curvlab.losses import (
    FISHER_TYPES,
    check_column_budget,
    check_loss,
    check_targets,
    fisher_columns,
    loss_scales,
    loss_value,
)
from curvlab.numerics import check_finite, check_vector
from curvlab.parameter_uses import ForwardWatch


@dataclass
class LayerCapture:
    """What one layer saw during the capture, as its kind reads it (:mod:`curvlab.layers`).

    Attributes:
        info: The layer's kind (name, sizes, flat-layout offset, layout maps).
        a: Rows ``ā`` ``(N, T, d_in_h)`` that ``W̄`` multiplies.  Kronecker kinds: the
            layer inputs, Linear inputs with leading dimensions flattened into ``T``
            (``T = 1`` for 2-D inputs), conv inputs unfolded to patches (``T`` = output
            locations), plus a trailing 1 when the layer has a trainable bias;
            per-sample kinds: ``1`` with ``T = 1``.
        e: Output rows ``(C', N, T, d_out)`` of the Fisher columns: the columns
            backpropagated to the layer output (Kronecker kinds), or the layer's
            per-(sample, column) gradients (per-sample kinds, ``d_out = P_l``).
        g: The mini-batch gradient's output rows ``(N, T, d_out)`` (``∂L/∂f``
            backpropagated to the layer output), so that the layer gradient is
            ``Σ_nt g_nt ā_ntᵀ``; ``None`` where a capture was assembled without them.
            :meth:`~curvlab.ExactFisher.natural_gradient` works from these rows.
        locations: Shape of the output locations, whose product is ``T``: ``(H_out,
            W_out)`` for Conv2d, ``(L_out,)`` for Conv1d, the extra leading dimensions
            for Linear (``()`` for 2-D inputs and per-sample kinds).
        groups: For a layer made of independent groups (``info.group_layouts``: grouped
            convolutions), one capture per group in that group's own layout (its
            patches ``(N, T, d_in_h)`` and output rows ``(C', N, T, C_out/G)``), from
            which the Kronecker methods build one factor pair per group; else ``None``.
        products: A route to the location products ``ā_nt · ā_ms`` cheaper than ``a``'s
            own (a stride-1 convolution's input channel products), which the
            location-pair Gram then uses; else ``None``.
    """

    info: LayerKind
    a: Tensor
    e: Tensor
    g: Tensor | None = None
    locations: tuple[int, ...] = ()
    groups: list[LayerCapture] | None = None
    products: LocationProducts | None = None

    @property
    def name(self) -> str:
        """The layer's module name."""
        return self.info.name


@dataclass
class Capture:
    """Everything the curvature objects need, from one forward and one backward.

    Attributes:
        layers: One :class:`LayerCapture` per supported layer, in flat-layout order.
        grad: Mini-batch gradient ``∇L`` as a flat vector ``(P,)`` (DESIGN.md layout);
            ``None`` for ``capture(..., gradient=False)``.
        columns: The Fisher columns ``g_nc`` in output space, ``(C', *output.shape)``.
        scale: ``s`` with ``F = s · Σ_nc J_nᵀ g_nc g_ncᵀ J_n`` (1/N for mean, 1 for sum;
            for cross-entropy with mean reduction 1/M, ``M`` the counted positions).
        loss: The mini-batch loss value.
        output: The detached model output ``(N, C)`` or ``(N, ..., C)``.
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"``.
        mc_samples: Labels sampled per input for ``"mc"``.
        grad_ratio: For ``"empirical"``, ``r = s·√c`` with gradient rows ``g = r·e``
            (the Fisher column is the gradient column rescaled), so that
            ``Uᵀ∇L = r·K·1``; ``None`` for the other types.
        grad_stamp: ``(data_ptr, version)`` of ``grad`` when the capture finished, so
            that :meth:`is_own_gradient` can tell the unmodified gradient from any other
            vector without comparing values.
        empirical_ratio: ``r = s·√c`` for every Fisher type: the empirical Fisher's
            column of sample ``n`` is its gradient rows ``g_n / r`` (``None`` where a
            capture was assembled without it, and for outputs with positions, whose
            empirical Fisher is per token).
        coupling: Why the forward pass does not treat the samples independently
            (:func:`curvlab.independence.sample_coupling`), or ``None`` when it does.
            The exact objects and the comparison refuse captures with a coupling;
            Kronecker factors do not need independence.
        exact_blocks: The exact per-layer blocks built on this capture that some
            curvature object still holds (:func:`curvlab.curvature.exact.exact_block`),
            so that each layer's Gram is assembled once however many objects use it.
    """

    layers: list[LayerCapture]
    grad: Tensor | None
    columns: Tensor
    scale: float
    loss: float
    output: Tensor
    fisher: str
    mc_samples: int
    grad_ratio: float | None = None
    grad_stamp: tuple[int, int] | None = None
    empirical_ratio: float | None = None
    coupling: str | None = None
    exact_blocks: weakref.WeakValueDictionary = field(
        default_factory=weakref.WeakValueDictionary, init=False, repr=False, compare=False
    )

    def is_own_gradient(self, v: Tensor) -> bool:
        """Whether ``v`` is this capture's ``grad`` itself (the same tensor, unmodified
        since the capture: same storage and version counter)."""
        return (
            v is self.grad
            and self.grad_stamp is not None
            and self.grad_stamp == (v.data_ptr(), v._version)
        )

    @property
    def num_params(self) -> int:
        """``P``, the length of flat vectors."""
        return sum(lc.info.num_params for lc in self.layers)

    @property
    def batch_size(self) -> int:
        """``N``."""
        return self.output.shape[0]

    @property
    def num_columns(self) -> int:
        """``C'``, Fisher columns per input."""
        return self.columns.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of every captured tensor (the model's)."""
        return self.output.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self.output.dtype

    @property
    def params(self) -> list[nn.Parameter]:
        """The captured parameters in flat-layout order."""
        return [p for lc in self.layers for p in lc.info.params]

    def split(self, v: Tensor) -> dict[str, Tensor]:
        """Flat vector ``(P,)`` -> per-layer ``[W | b]`` matrices ``(d_out, d_in_h)``."""
        check_vector(v, self.num_params)
        return {lc.name: lc.info.to_matrix(v[lc.info.slice]) for lc in self.layers}

    def join(self, mats: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        return torch.cat([lc.info.to_flat(mats[lc.name]).reshape(-1) for lc in self.layers])

    def params_vector(self) -> Tensor:
        """The current parameter values as a flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def capture(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    fisher: str = "mc",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    gradient: bool = True,
) -> Capture:
    """Run one forward and one batched backward and record what curvature needs.

    Args:
        model: Network whose trainable modules each have a layer kind
            (:mod:`curvlab.layers`; any module through the generic per-sample path).
            Must output ``(N, C)`` or, with positions (tokens, pixels), ``(N, ..., C)``.
        loss_fn: ``nn.CrossEntropyLoss`` (``ignore_index`` honoured),
            ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` with reduction ``"mean"`` or
            ``"sum"``.
        inputs: Batch of ``N`` inputs on the model's device.
        targets: Labels: for cross-entropy class indices ``(N, ...)`` (the output's
            shape without its last, class, dimension) or probabilities ``(N, C)``; the
            output's shape otherwise.
        fisher: ``"mc"`` (sampled labels), ``"exact"`` (type-2 Fisher = GGN) or
            ``"empirical"`` (data labels).
        mc_samples: Sampled labels per input for ``"mc"`` (``C' = mc_samples``).
        generator: Random generator for ``"mc"``, for reproducible samples.
        gradient: Form the flat mini-batch gradient ``Capture.grad``.  With ``False``
            it is ``None`` (one ``P``-sized contraction per layer saved); the
            gradient's output rows are kept either way, which is all
            :meth:`~curvlab.ExactFisher.natural_gradient` needs.

    Returns:
        The :class:`Capture`; all of its tensors live on the model's device.

    Outputs with positions ``(N, ..., C)`` (curvlab.losses): the class dimension is
    last, and the loss is exactly ``loss_fn(out.flatten(0, -2), y.flatten())`` for
    cross-entropy (mean over the positions whose target is not ``ignore_index``) and
    ``loss_fn(out, y)`` (mean over all entries) for MSE and BCE.  A cross-entropy call
    that PyTorch would read with class dimension 1 is refused.  Fisher columns per
    sample (``C'``) with ``T`` positions and ``C`` classes: ``exact`` has ``T·C`` (one
    per position and class; refused when the Gram would exceed the memory budget),
    ``mc`` has ``mc_samples`` (labels sampled at every position, unbiased for the GGN),
    ``empirical`` has ``T`` (per-token gradients, curvlinops' ``EFLinearOperator``).

    The model runs in the mode it is in: in ``train()`` mode its forward pass updates
    BatchNorm running statistics once, as one training forward would; call
    ``model.eval()`` first for a diagnostic that must leave the model untouched.

    Parameters used by several module calls — tied weights shared between modules, a
    module called more than once — are read exactly: every call of a captured module is
    recorded, and such parameters form one layer whose per-sample gradients are the sums
    over their calls (:class:`~curvlab.layers.shared.SharedKind`; approximations use its
    exact block).

    Checked on every capture (:mod:`curvlab.parameter_uses`, :mod:`curvlab.independence`):
    each layer's input is batch-first and each captured parameter reaches the loss only
    through calls of modules that own it (else
    :class:`~curvlab.errors.UnsupportedModelError`), and whether the forward pass keeps
    samples independent (``Capture.coupling``; BatchNorm with batch statistics or any
    module mixing the batch, found by a small probe forward pass).
    """
    if fisher not in FISHER_TYPES:
        raise OptionError(f"fisher={fisher!r} is unknown; choose one of {', '.join(FISHER_TYPES)}.")
    if int(mc_samples) != mc_samples or mc_samples < 1:
        raise OptionError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    check_loss(loss_fn)
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ShapeError("inputs and targets must be torch.Tensors.")
    if inputs.shape[0] != targets.shape[0]:
        raise ShapeError(
            f"inputs have batch size {inputs.shape[0]} but targets {targets.shape[0]}."
        )
    check_finite(inputs, "inputs")
    layers = find_layers(model)
    uses = list({use.name: use for info in layers for use in info.uses}.values())

    saved: dict[str, list[ModuleCall]] = {use.name: [] for use in uses}
    handles = [
        # first among the module's forward hooks: it sees the module's own output, and
        # hooks of the user's that change the output act downstream of it
        use.module.register_forward_hook(_recorder(use, saved), with_kwargs=True, prepend=True)
        for use in uses
    ]
    try:
        with torch.enable_grad(), ForwardWatch(uses) as watch:
            output = model(inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [use.name for use in uses if not saved[use.name]]
    if missing:
        raise UnsupportedModelError(
            f"layers {missing} have trainable parameters but were not used in the forward "
            "pass; freeze them."
        )
    if not isinstance(output, Tensor):
        raise ShapeError("the model must return a single tensor of shape (N, C) or (N, ..., C).")
    layers = share_repeated(layers, {name: len(calls) for name, calls in saved.items()})
    watch.check(model, output, inputs.shape[0])
    check_targets(loss_fn, output, targets)
    check_finite(output, "model output", "Check the inputs and the parameters.")
    if output.dim() > 2:
        check_column_budget(output, fisher, mc_samples)

    loss = loss_value(loss_fn, output, targets)
    (grad_output,) = torch.autograd.grad(loss, output, retain_graph=True)
    f = output.detach()
    cols = fisher_columns(loss_fn, f, targets, grad_output.detach(), fisher, mc_samples, generator)
    scale, c = loss_scales(loss_fn, f, targets)
    # One batched backward: the gradient column first, then the C' Fisher columns.
    # A single empirical column (no positions) is the gradient column over s·√c:
    # backpropagate it once.
    empirical = fisher == "empirical" and cols.shape[0] == 1
    grad_outputs = grad_output.unsqueeze(0)
    if not empirical:
        grad_outputs = torch.cat([grad_outputs, cols.to(f.dtype)])
    calls = [call for use in uses for call in saved[use.name]]
    layer_grads = torch.autograd.grad(
        output,
        [call.target for call in calls],
        grad_outputs=grad_outputs,
        is_grads_batched=True,
        allow_unused=True,
    )
    for call, g in zip(calls, layer_grads):
        if g is None:
            g = torch.zeros(
                (grad_outputs.shape[0], *call.out.shape), dtype=f.dtype, device=f.device
            )
        call.grads = g.detach()

    records: list[LayerCapture] = []
    grad = f.new_empty(sum(info.num_params for info in layers)) if gradient else None
    for info in layers:
        mine = [call for use in info.uses for call in saved[use.name]]
        a, rows, grouped = info.read_calls(mine)
        check_finite(rows, f"output gradients of layer '{info.name}'")
        # calls read as more locations of one layer: those locations, without geometry
        locations = info.locations(mine[0].out) if len(mine) == 1 else (a.shape[1],)

        def columns(r: Tensor) -> Tensor:
            return r[:1] / (scale * math.sqrt(c)) if empirical else r[1:]

        groups = None
        if grouped is not None:
            ga, grows = grouped[0].movedim(2, 0), grouped[1].movedim(3, 0)
            groups = [
                LayerCapture(lay, ga[k], columns(grows[k]), grows[k, 0], locations)
                for k, lay in enumerate(info.group_layouts)
            ]
        e = columns(rows)
        products = info.location_products(mine)
        if products is not None and not _pairs_take(products, a, e):
            products = None  # the per-sample scheme is cheaper: do not hold the input
        records.append(LayerCapture(info, a, e, rows[0], locations, groups, products))
        if grad is not None:
            info.weight_product(rows[0], a, out=grad[info.slice])
    return Capture(
        layers=records,
        grad=grad,
        columns=cols,
        scale=scale,
        loss=float(loss.detach()),
        output=f,
        fisher=fisher,
        mc_samples=int(mc_samples) if fisher == "mc" else 1,
        grad_ratio=scale * math.sqrt(c) if fisher == "empirical" else None,
        grad_stamp=None if grad is None else (grad.data_ptr(), grad._version),
        # the per-sample empirical rows; outputs with positions use per-token columns
        empirical_ratio=scale * math.sqrt(c) if f.dim() == 2 else None,
        coupling=sample_coupling(model, inputs, f, watch.ambiguous),
    )


def _pairs_take(products: LocationProducts, a: Tensor, e: Tensor) -> bool:
    """Whether the Gram's scheme choice picks location pairs through ``products`` for
    rows ``a (N, T, d_in_h)`` and output rows ``e (C', N, T, d_out)``."""
    from curvlab.curvature.gram import choose_scheme  # the curvature package imports capture

    c, n, t, d_out = e.shape
    return choose_scheme(n, c, t, a.shape[-1], d_out, products) == "pairs"


def _recorder(use: ModuleKind, saved: dict[str, list[ModuleCall]]):
    """A forward hook that records every call of ``use``'s module.

    The backward reads each call's output-gradients at the output's gradient edge (the
    autograd node that produced it), which in-place operations downstream (e.g.
    ``ReLU(inplace=True)``) do not move, so the output is handed on unchanged.  An
    output that is a view (an in-place change of a view re-routes its gradient around
    the view's node) or has no autograd node is handed on as a copy instead, and the
    untouched original is differentiated.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: object) -> object:
        y = use.output(out)
        x = use.record(args, kwargs)
        if y.grad_fn is None or y._is_view():
            saved[use.name].append(ModuleCall(use, x, y.detach(), y))
            return use.with_output(out, y.clone())
        kept = y.detach().clone() if use.reads_output else y.detach()
        saved[use.name].append(ModuleCall(use, x, kept, get_gradient_edge(y)))
        return None

    return hook

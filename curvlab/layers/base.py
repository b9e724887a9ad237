"""The layer-kind interface: what one trainable module means to the capture.

Every captured module is presented to the curvature code in one form: a matrix layer
``W̄`` of shape ``d_out x d_in_h`` acting on rows ``ā_nt`` (``d_in_h`` columns) at ``T``
locations per sample, so that the gradient of the Fisher column ``c`` of sample ``n``
w.r.t. the layer's parameters is

    Γ_nc = Σ_t e_nct ā_ntᵀ      (d_out x d_in_h),

with ``e_nct`` the layer's *output rows* for that column.  The curvature objects only
ever see ``ā`` (``LayerCapture.a``), ``e`` and the layout maps of this class; nothing
downstream branches on module types.  Two families implement it:

* **Kronecker kinds** (:class:`MatrixKind`: Linear, Conv): ``ā`` are the (unfolded)
  layer inputs with a homogeneous 1 for a trainable bias, ``e`` the backpropagated
  output-gradients; ``Γ`` factorises over locations, so KFAC's ``A ⊗ G`` is defined.
* **Per-sample kinds** (:class:`PerSampleKind`: norms, PReLU, the generic fallback):
  ``T = 1``, ``ā = 1`` (``d_in_h = 1``) and ``e_nc`` is the layer's per-(sample, column)
  gradient itself (``d_out = P_l``), computed from the captured input and output
  gradient.  Then the Gram, ``Uᵀv`` and ``U c`` formulas hold unchanged, the "input
  factor" is the scalar 1 and the "gradient factor" is the exact layer block; the
  approximations use that exact block (``kronecker = False``).  Shared parameters
  (:class:`~curvlab.layers.shared.SharedKind`) are presented the same way.
* **Grouped kinds** (:class:`~curvlab.layers.conv.GroupedConvKind`): per-sample kinds
  whose groups are Kronecker layers of their own (:attr:`LayerKind.group_layouts`,
  :class:`BlockLayout`); the capture keeps each group's rows (``LayerCapture.groups``)
  and KFAC, EKFAC and FOOF build one factor pair per group on them.

The flat layout (DESIGN.md) is the module's trainable parameters in registration order,
each flattened row-major; :meth:`Layout.to_matrix` / :meth:`Layout.to_flat` map
between a flat slice and ``W̄``.

A layer reads the recorded calls of its *uses* (:attr:`LayerKind.uses`): a
:class:`ModuleKind` is one module called once per forward pass (its only use is itself);
parameters used by several modules or module calls (tied weights, a block applied twice)
form one :class:`~curvlab.layers.shared.SharedKind` whose per-sample gradients are the
sums over those calls (:meth:`ModuleKind.sample_gradients`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError, UnsupportedModelError
from curvlab.numerics import long_tmm


class Layout(ABC):
    """The flat layout of a matrix layer ``W̄`` (``d_out x d_in_h``): the maps between
    a flat slice and ``W̄``.  The default is the weight ``(d_out, d_in)`` row-major,
    then the bias (one entry per row).

    Attributes:
        name: The layer's name (a module name; a group of a grouped layer adds
            ``[group g]``).
        offset: Start of this layout's slice in the flat parameter vector.
        kronecker: Whether ``Γ_nc = Σ_t e_nct ā_ntᵀ`` comes from the layer's inputs and
            output-gradients, so that Kronecker factors ``A ⊗ G`` are meaningful; when
            ``False`` the approximations use the layer's exact block.
        convolutional: Whether the locations ``t`` are positions of a convolution
            sharing one weight (what the KFC checks examine).
    """

    kronecker: bool = False
    convolutional: bool = False
    name: str
    offset: int

    @property
    @abstractmethod
    def d_in(self) -> int:
        """Columns of ``W̄`` without a homogeneous bias column."""

    @property
    @abstractmethod
    def d_out(self) -> int:
        """Rows of ``W̄``."""

    @property
    def has_bias(self) -> bool:
        """Whether ``W̄`` ends with a bias column (multiplying a homogeneous 1)."""
        return False

    @property
    def d_in_h(self) -> int:
        """Columns of ``W̄``: ``d_in`` plus one for a bias column."""
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """Number of entries of this layer in the flat vector (``d_out · d_in_h``)."""
        return self.d_out * self.d_in_h

    @property
    def slice(self) -> slice:
        """This layer's slice of the flat parameter vector."""
        return slice(self.offset, self.offset + self.num_params)

    def to_matrix(self, flat: Tensor) -> Tensor:
        """Flat slice ``(..., num_params)`` -> ``W̄`` of shape ``(..., d_out, d_in_h)``."""
        lead = flat.shape[:-1]
        n_w = self.d_out * self.d_in
        w = flat[..., :n_w].reshape(*lead, self.d_out, self.d_in)
        if not self.has_bias:
            return w
        return torch.cat([w, flat[..., n_w:].unsqueeze(-1)], dim=-1)

    def to_flat(self, mat: Tensor) -> Tensor:
        """``W̄`` of shape ``(..., d_out, d_in_h)`` -> flat slice ``(..., num_params)``."""
        lead = mat.shape[:-2]
        w = mat[..., : self.d_in].reshape(*lead, self.d_out * self.d_in)
        if not self.has_bias:
            return w
        return torch.cat([w, mat[..., self.d_in]], dim=-1)

    def flat_index(self) -> Tensor:
        """Index ``p`` with ``flat[p] == W̄.flatten()`` (row-major), for dense blocks."""
        positions = torch.arange(self.num_params, dtype=torch.float64)
        return self.to_matrix(positions).reshape(-1).long()

    def weight_product(self, rows: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        """``Σ_nt rows_nt ā_ntᵀ`` as this layer's flat slice ``(num_params,)``.

        With ``rows`` the gradient's output rows this is the layer's gradient.  One matrix
        product (the bias part as a row sum), written straight into the flat layout.

        Args:
            rows: Output rows ``(N, T, d_out)``.
            a: Rows ``ā`` ``(N, T, d_in_h)``.
            out: Optional destination ``(num_params,)``, e.g. a slice of a flat vector.
        """
        if out is None:
            out = rows.new_empty(self.num_params)
        r = rows.reshape(-1, self.d_out)
        x = a.reshape(-1, self.d_in_h)
        n_w = self.d_out * self.d_in
        long_tmm(r, x[:, : self.d_in], out=out[:n_w].view(self.d_out, self.d_in))
        if self.has_bias:
            torch.sum(r, dim=0, out=out[n_w:])
        return out


class BlockLayout(Layout):
    """One group of a grouped layer as a matrix layer of its own: ``W̄_g``
    (``d_out x d_in_h``) in the default layout, at offset 0 of the group's own slice.

    A grouped layer's kind lists these (:attr:`LayerKind.group_layouts`) and maps its
    flat slice to the groups' slices in order (its ``group_order()``); the Kronecker
    methods build one factor pair per group on them.
    """

    kronecker = True

    def __init__(self, name: str, d_out: int, d_in: int, has_bias: bool, convolutional: bool):
        self.name, self.offset = name, 0
        self._d_out, self._d_in, self._has_bias = d_out, d_in, has_bias
        self.convolutional = convolutional

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def has_bias(self) -> bool:
        return self._has_bias


class LocationProducts(Protocol):
    """A cheaper route to a layer's location products ``ā_nt · ā_ms`` than its rows ``ā``
    (e.g. a convolution's input channel products, :class:`~curvlab.layers.conv.InputProducts`)."""

    def cost(self, n: int) -> float:
        """Multiply-adds of all ``N² T²`` products for ``n`` samples."""

    def __call__(self, lo: int, hi: int, upto: int, dtype: torch.dtype) -> Tensor:
        """``(hi − lo, T, upto, T)``: samples ``[lo, hi)`` against samples ``[0, upto)``."""


class LayerKind(Layout):
    """One trainable module: its layout, and how to read what the capture recorded.

    Attributes:
        name: The module's name in ``model.named_modules()``.
        module: The module itself.
        offset: Start of this layer's slice in the flat parameter vector.
        owns_submodules: Whether the kind reads the trainable parameters of the
            module's submodules too (they get no kind of their own).
    """

    owns_submodules: bool = False

    def __init__(self, name: str, module: nn.Module, offset: int):
        self.name, self.module, self.offset = name, module, offset

    @classmethod
    def layers(cls, name: str, module: nn.Module, offset: int) -> list[LayerKind]:
        """The layers ``module`` is read as, from flat offset ``offset`` on: by default
        one of this kind (kinds of several layers, e.g. attention's projections, split)."""
        return [cls(name, module, offset)]

    @property
    @abstractmethod
    def params(self) -> list[nn.Parameter]:
        """The layer's trainable parameters in flat-layout order."""

    @property
    def group_layouts(self) -> list[BlockLayout] | None:
        """For a layer made of independent groups (grouped convolutions), one layout per
        group, whose Kronecker factors the approximations use; ``None`` otherwise.  Such a
        kind also has ``group_order()``: the positions of its slice in the order of the
        groups' slices, one after the other."""
        return None

    # -- reading a capture ---------------------------------------------------------------

    @property
    @abstractmethod
    def uses(self) -> list[ModuleKind]:
        """The module kinds whose calls this layer reads (the capture records every call
        of their modules)."""

    @abstractmethod
    def read_calls(
        self, calls: Sequence[ModuleCall]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """The rows ``ā`` and output rows of one capture from the calls of :attr:`uses`
        (and, for a layer with :attr:`group_layouts`, the rows per group, as
        :meth:`ModuleKind.read_grouped`).

        Args:
            calls: Every recorded call of the modules of :attr:`uses`, with their
                output-gradients.

        Returns:
            ``ā`` ``(N, T, d_in_h)``, the output rows ``(B, N, T, d_out)`` and the
            groups' rows or ``None``.
        """

    @abstractmethod
    def locations(self, out: Tensor) -> tuple[int, ...]:
        """Shape of the ``T`` locations for the output ``out`` of a use's call."""

    def location_products(self, calls: Sequence[ModuleCall]) -> LocationProducts | None:
        """A route to ``ā_nt · ā_ms`` cheaper than the rows :meth:`read_calls` returns,
        for these calls, or ``None`` (the default: none is cheaper)."""
        return None


@dataclass
class ModuleCall:
    """One recorded call of a captured module.

    Attributes:
        kind: The module's kind.
        x: What :meth:`ModuleKind.record` kept of the call (by default its detached input).
        out: The call's output (:meth:`ModuleKind.output`), detached: its shape, dtype and
            device, and for a kind with :attr:`ModuleKind.reads_output` its values at the
            call.
        target: What the backward differentiates to get the output-gradients: the
            output's gradient edge (the autograd node that produced it, which in-place
            operations downstream leave in place) or the attached output itself.
        grads: ``B`` backpropagated output-gradients ``(B, *out.shape)`` (the gradient
            column first, then the Fisher columns), once the backward has run.
    """

    kind: ModuleKind
    x: object
    out: Tensor
    target: Tensor | GradientEdge
    grads: Tensor | None = None


class ModuleKind(LayerKind):
    """One module, read from its call (or, where :attr:`calls_as_locations`, from all of
    its calls)."""

    #: Peak memory of :meth:`sample_gradients` in units of its result.
    memory_factor: int = 1

    #: Whether :meth:`read` uses the values of the call's output, not only its shape (the
    #: capture then keeps a copy: operations downstream may change the output in place).
    reads_output: bool = False

    #: Whether several calls of the module are read as more locations of one call (a
    #: matrix layer whose locations carry no geometry); otherwise a module called more
    #: than once is read as a :class:`~curvlab.layers.shared.SharedKind`.
    calls_as_locations: bool = False

    @property
    def uses(self) -> list[ModuleKind]:
        return [self]

    # -- the module's call ---------------------------------------------------------------

    @property
    def batch_dim(self) -> int:
        """Dimension of the batch in the module's inputs and output (0: batch-first)."""
        return 0

    def inputs(self, args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
        """The data tensors of one call of the module (what it computes from besides its
        parameters): by default its one positional input.

        Raises:
            UnsupportedModelError: the module was called otherwise.
        """
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise UnsupportedModelError(
                f"module '{self.name}' received {len(args)} positional and {len(kwargs)} "
                "keyword inputs; its kind reads one input tensor, passed positionally."
            )
        return args

    def record(self, args: tuple, kwargs: dict) -> object:
        """What the capture keeps of one call for :meth:`read` (``x``): by default the
        one input tensor, detached."""
        return self.inputs(args, kwargs)[0].detach()

    def output(self, out: object) -> Tensor:
        """The output tensor whose gradients the capture takes (``out`` itself by
        default)."""
        if not isinstance(out, Tensor):
            raise UnsupportedModelError(
                f"module '{self.name}' returned a {type(out).__name__}; its kind reads "
                "modules that return one tensor."
            )
        return out

    def with_output(self, out: object, tensor: Tensor) -> object:
        """``out`` with :meth:`output`'s tensor replaced by ``tensor``."""
        return tensor

    # -- reading a capture ---------------------------------------------------------------

    @abstractmethod
    def read(self, x: Tensor, out: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``ā`` and output rows of one capture.

        Args:
            x: What :meth:`record` kept of the call (the module's detached input).
            out: The module's output tensor (:meth:`output`, for its shape).
            grads: ``B`` backpropagated output-gradients ``(B, *out.shape)`` (the
                gradient column first, then the Fisher columns).

        Returns:
            ``ā`` ``(N, T, d_in_h)`` and the output rows ``(B, N, T, d_out)``.
        """

    def read_grouped(
        self, x: Tensor, out: Tensor, grads: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """:meth:`read`, plus for a layer with :attr:`group_layouts` its rows per group:
        ``ā`` ``(N, T, G, d_in_h)`` and output rows ``(B, N, T, G, d_out)`` of the
        groups' layouts (``None`` for other layers)."""
        a, rows = self.read(x, out, grads)
        return a, rows, None

    def read_calls(
        self, calls: Sequence[ModuleCall]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        if len(calls) != 1:
            raise UnsupportedModelError(
                f"module '{self.name}' ({type(self.module).__name__}) was called "
                f"{len(calls)} times but is read as a single call."
            )
        (call,) = calls
        return self.read_grouped(call.x, call.out, call.grads)

    def sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        """``(B, N, num_params)``: the gradient of ``Σ grads[b, n] · out[n]`` w.r.t. this
        module's parameters for every column ``b`` and sample ``n`` of one call, in its
        flat-layout order (``Σ_t e_bnt ā_ntᵀ`` as a flat slice)."""
        a, rows = self.read(x, out, grads)
        return self.to_flat(torch.einsum("bnto,ntk->bnok", rows, a))


class MatrixKind(ModuleKind):
    """A layer computing ``W̄ ā_nt`` at every location: weight ``(d_out, ...)`` and an
    optional bias; ``ā`` from :meth:`unfold`, output rows from :meth:`output_rows`."""

    kronecker = True

    @property
    def params(self) -> list[nn.Parameter]:
        out = [self.module.weight]
        if self.has_bias:
            out.append(self.module.bias)
        return out

    @property
    def has_bias(self) -> bool:
        bias = self.module.bias
        return bias is not None and bias.requires_grad

    @property
    def d_in(self) -> int:
        return self.module.weight[0].numel()

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[0]

    @abstractmethod
    def unfold(self, x: Tensor) -> Tensor:
        """Layer input -> rows ``(N, T, d_in_h)`` that ``W̄`` multiplies."""

    @abstractmethod
    def output_rows(self, g: Tensor) -> Tensor:
        """Output-shaped ``(B, N, *out)`` -> ``(B, N, T, d_out)`` matching :meth:`unfold`."""

    def read(self, x: Tensor, out: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        return self.unfold(x), self.output_rows(grads)

    def read_calls(
        self, calls: Sequence[ModuleCall]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """One call as :meth:`read`; with :attr:`calls_as_locations`, several calls as
        the locations of all of them, ``ā`` ``(N, Σ T_call, d_in_h)`` and output rows
        ``(B, N, Σ T_call, d_out)``: ``Γ_nc = Σ_calls Σ_t e_nct ā_ntᵀ`` is the sum over
        the calls, and the calls are the weight-sharing dimension of KFAC's "expand" and
        "reduce" factors (as the positions of a sequence are)."""
        if len(calls) == 1 or not self.calls_as_locations:
            return super().read_calls(calls)
        parts = [self.read(c.x, c.out, c.grads) for c in calls]
        a = torch.cat([p[0] for p in parts], dim=1)
        return a, torch.cat([p[1] for p in parts], dim=2), None


class PerSampleKind(ModuleKind):
    """A layer read through its per-(sample, column) gradients (``ā = 1``, ``T = 1``).

    Subclasses implement :meth:`per_sample_gradients`; :meth:`read` checks their size
    against ``curvlab.config.options.memory_budget`` first.
    """

    kronecker = False

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters(recurse=False) if p.requires_grad]

    @property
    def d_in(self) -> int:
        return 1

    @property
    def d_out(self) -> int:
        return sum(p.numel() for p in self.params)

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return ()

    @abstractmethod
    def per_sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        """``(B, N, num_params)``: the gradient of ``Σ grads[b, n] · out[n]`` w.r.t. the
        layer's parameters for every ``b`` and ``n``, in flat-layout order."""

    def read(self, x: Tensor, out: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        self.check_budget(grads.shape[0], grads.shape[1 + self.batch_dim], grads.element_size())
        return self.as_rows(self.per_sample_gradients(x, out, grads))

    def sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        return self.per_sample_gradients(x, out, grads)

    def as_rows(self, psg: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients ``(B, N, P_l)`` -> ``ā = 1`` ``(N, 1, 1)`` and output rows
        ``(B, N, 1, P_l)``."""
        rows = psg.unsqueeze(2)
        return rows.new_ones(1, 1, 1).expand(psg.shape[1], 1, 1), rows

    def check_budget(self, b: int, n: int, element_size: int) -> None:
        """Refuse ``b`` columns of ``n`` per-sample gradients (``element_size`` bytes per
        entry) above the memory budget."""
        need = b * n * self.num_params * element_size * self.memory_factor
        if need > options.memory_budget:
            raise MemoryBudgetError(
                f"module '{self.name}' ({type(self.module).__name__}) is read through its "
                f"per-sample gradients: {b} columns x {n} samples x {self.num_params} "
                f"parameters need about {format_bytes(need)}, over the memory budget of "
                f"{format_bytes(options.memory_budget)}. Use a smaller batch, fisher='mc' "
                "(one column per sample), freeze the module, or raise "
                "curvlab.config.options.memory_budget."
            )

"""Parameters used by several module calls: tied weights and modules called repeatedly.

When a parameter enters the forward pass through more than one call — an embedding
matrix reused as the output head, one convolution, norm or attention module applied
twice — its per-(sample, column) gradient is the sum of what each call contributes,

    ∂(g_ncᵀ f_n)/∂θ = Σ_calls Γ_nc^call,

so the Gram of the layer carries the cross terms between the calls.  A
:class:`SharedKind` owns such parameters' slice of the flat layout once (at the position
``model.parameters()`` gives them, i.e. in the first module that registers them) and
reads every call of every module that uses them: each call's per-sample gradients
(:meth:`~curvlab.layers.base.ModuleKind.sample_gradients`, e.g. an Embedding's
output-gradients scattered to its tokens, a Linear's ``Σ_t e_nt ā_ntᵀ``) are added into
the parameters' places.  The result is presented like a per-sample kind (``ā = 1``,
``T = 1``, output rows = the per-sample gradients), so every exact object is exact for
it; it has no Kronecker factors, so the approximations use its exact block.  (A
Linear or Embedding called several times is no shared layer: its calls are read as more
locations of its own kind, ``ModuleKind.calls_as_locations``, which keeps its Kronecker
factors.)

A module whose parameters are split between layers (a tied head ``nn.Linear`` with its
own bias) contributes to each: the tied weight's layer and a layer of its remaining
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError
from curvlab.layers.base import LayerKind, ModuleCall, ModuleKind


class SharedKind(LayerKind):
    """Parameters read through the calls of several uses (or one use called repeatedly).

    Args:
        name: The layer's name: the module that registers the parameters first.
        module: That module.
        offset: Start of the layer's slice in the flat parameter vector.
        params: The parameters in flat-layout order (``model.parameters()`` order).
        uses: Every module kind whose calls use any of ``params``.
    """

    kronecker = False

    def __init__(
        self,
        name: str,
        module: nn.Module,
        offset: int,
        params: Sequence[nn.Parameter],
        uses: Sequence[ModuleKind],
    ):
        super().__init__(name, module, offset)
        self._params, self._uses = list(params), list(uses)
        starts, pos = {}, 0
        for p in self._params:
            starts[id(p)] = pos
            pos += p.numel()
        # per use: (slice of its sample gradients, slice of this layer) for each shared parameter
        self._pieces: dict[str, list[tuple[slice, slice]]] = {}
        for use in self._uses:
            pieces, src = [], 0
            for p in use.params:
                if id(p) in starts:
                    dst = starts[id(p)]
                    pieces.append((slice(src, src + p.numel()), slice(dst, dst + p.numel())))
                src += p.numel()
            self._pieces[use.name] = pieces

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._params)

    @property
    def uses(self) -> list[ModuleKind]:
        return list(self._uses)

    @property
    def d_in(self) -> int:
        return 1

    @property
    def d_out(self) -> int:
        return sum(p.numel() for p in self._params)

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return ()

    def read_calls(self, calls: Sequence[ModuleCall]) -> tuple[Tensor, Tensor, None]:
        """``ā = 1`` ``(N, 1, 1)`` and the summed per-sample gradients ``(B, N, 1, P_l)``
        (no groups).

        Raises:
            MemoryBudgetError: the per-sample gradients (this layer's and the largest
                call's) would exceed ``curvlab.config.options.memory_budget``.
        """
        first = calls[0]
        b, n = first.grads.shape[0], first.grads.shape[1 + first.kind.batch_dim]
        self._check_budget(calls, b, n, first.grads.element_size())
        rows = first.grads.new_zeros(b, n, self.num_params)
        for call in calls:
            psg = call.kind.sample_gradients(call.x, call.out, call.grads)
            for src, dst in self._pieces[call.kind.name]:
                rows[..., dst] += psg[..., src]
        return rows.new_ones(1, 1, 1).expand(n, 1, 1), rows.unsqueeze(2), None

    def _check_budget(self, calls: Sequence[ModuleCall], b: int, n: int, size: int) -> None:
        widest = max(c.kind.num_params * c.kind.memory_factor for c in calls)
        need = b * n * (self.num_params + widest) * size
        if need > options.memory_budget:
            names = ", ".join(dict.fromkeys(f"'{c.kind.name}'" for c in calls))
            raise MemoryBudgetError(
                f"the parameters of layer '{self.name}' are used by {len(calls)} module calls "
                f"({names}) and are read through per-sample gradients: {b} columns x {n} "
                f"samples x ({self.num_params} + {widest}) entries need about "
                f"{format_bytes(need)}, over the memory budget of "
                f"{format_bytes(options.memory_budget)}. Use a smaller batch, fisher='mc' "
                "(one column per sample), untie the weights, freeze them, or raise "
                "curvlab.config.options.memory_budget."
            )

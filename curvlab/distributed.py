"""Data-parallel curvature: the Gram and the Kronecker factors of a batch split over ranks.

Each rank runs :func:`curvlab.capture` on its own shard of the batch (``N_r`` samples,
``N = Σ_r N_r``); this module combines the shards with ``torch.distributed`` so that
every rank holds the curvature of the *concatenated* batch (rank 0's samples first),
exactly as a single process capturing the whole batch would:

* :func:`gather_capture`: the global :class:`~curvlab.capture.Capture` on every rank:
  layer inputs ``a`` and output-gradient columns ``e`` all-gathered (they are
  independent of the shard size), the gradient and loss all-reduced with the weights
  of the loss reduction, the scale ``s`` made global (``1/N`` for ``mean``).
* :func:`distributed_gram`: ``K = UᵀU`` assembled block-wise: rank ``r`` computes its
  block row ``K[rows of r, :]`` from its own ``a``/``e`` against the gathered ones
  (``1/R`` of the work), then the block rows are all-gathered.
* :class:`DistributedExactFisher`: :class:`~curvlab.ExactFisher` of the global batch
  whose Gram comes from :func:`distributed_gram`, whose ``Uᵀ v`` is computed row-block
  by row-block (all-gather) and whose ``U c`` is summed over ranks (all-reduce), so
  that the ``O(N P)`` work of ``mv``/``solve`` is split too.
* :func:`kfac_factors`, :class:`DistributedKFAC`, :class:`DistributedFOOF`: the
  Kronecker factors' sums all-reduced (``A = Σ_r Σ ā āᵀ / (N T)``, ``G = s Σ_r Σ e eᵀ``).

Shards may have different sizes (tensors are padded for the all-gathers).  Without an
initialised process group everything runs as a single rank.  Collective calls must be
made by every rank of the group in the same order: construct these objects and call
``gram``/``mv``/``solve`` on all ranks (SPMD).  The cost model is in
``benchmarks/DISTRIBUTED.md``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.exact import ExactFisher
from curvlab.curvature.factors import KFAC_APPROX, LayerFactors, grad_factor, input_factor_sum
from curvlab.curvature.foof import exact_layer_block, foof_block
from curvlab.curvature.gram import SCHEMES, choose_scheme, gram_rows
from curvlab.curvature.kfac import DAMPING_MODES, KFAC, KFACBlock
from curvlab.errors import OptionError
from curvlab.numerics import SOLVE_DTYPE, check_choice, compute_dtype

REDUCTIONS = ("mean", "sum")

# ----------------------------------------------------------------------------------
# communication helpers (identity without a process group)
# ----------------------------------------------------------------------------------


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if _active(group) else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    return dist.get_rank(group) if _active(group) else 0


def all_gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not _active(group):
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def all_gather_dim(t: Tensor, sizes: list[int], dim: int, group=None) -> Tensor:
    """Concatenate every rank's ``t`` along ``dim``; rank ``r``'s has ``sizes[r]`` there."""
    if not _active(group):
        return t
    big = max(sizes)
    pad = big - t.shape[dim]
    if pad:
        shape = list(t.shape)
        shape[dim] = pad
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """``Σ_r t_r`` on every rank (a new tensor)."""
    t = t.clone()
    if _active(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# ----------------------------------------------------------------------------------
# the global capture
# ----------------------------------------------------------------------------------


def _reduction(capture: Capture, sizes: list[int], reduction: str | None, group) -> str:
    """The loss reduction, given or inferred from every rank's scale (``1/N_r`` or 1)."""
    if reduction is not None:
        if reduction not in REDUCTIONS:
            raise OptionError(f"reduction={reduction!r} is unknown; choose 'mean' or 'sum'.")
        return reduction
    scales = all_gather_dim(
        torch.tensor([capture.scale], dtype=torch.float64, device=capture.device),
        [1] * len(sizes),
        0,
        group,
    ).tolist()
    if all(n == 1 for n in sizes):
        raise OptionError(
            "every shard holds one sample, so 'mean' and 'sum' reductions look alike; "
            "pass reduction='mean' or 'sum'."
        )
    is_mean = [abs(s * n - 1.0) < 1e-9 for s, n in zip(scales, sizes)]
    is_sum = [abs(s - 1.0) < 1e-12 for s in scales]
    if all(m or n == 1 for m, n in zip(is_mean, sizes)) and any(
        m and n > 1 for m, n in zip(is_mean, sizes)
    ):
        return "mean"
    if all(is_sum):
        return "sum"
    raise OptionError(f"the shards' loss scales {scales} fit neither 'mean' nor 'sum'.")


def gather_capture(capture: Capture, group=None, reduction: str | None = None) -> Capture:
    """The :class:`Capture` of the concatenated batch, on every rank.

    Args:
        capture: This rank's capture of its shard.
        group: Process group (default: the world).
        reduction: The loss's ``"mean"`` or ``"sum"``; inferred from the scales when
            omitted (ambiguous only when every shard has one sample).

    Returns:
        A capture whose ``layers`` hold the gathered ``a``/``e`` (rows ordered by rank),
        ``grad`` and ``loss`` of the whole batch, ``scale`` = ``1/N`` (mean) or 1 (sum),
        and the gathered ``columns`` and ``output``.
    """
    sizes = all_gather_sizes(capture.batch_size, capture.device, group)
    red = _reduction(capture, sizes, reduction, group)
    total = sum(sizes)
    scale = 1.0 / total if red == "mean" else 1.0
    weight = scale / capture.scale  # N_r / N for mean, 1 for sum
    layers = [
        LayerCapture(
            lc.info,
            all_gather_dim(lc.a, sizes, 0, group),
            all_gather_dim(lc.e, sizes, 1, group),
            locations=lc.locations,
        )
        for lc in capture.layers
    ]
    grad = all_reduce_sum(capture.grad * weight, group)
    loss = all_reduce_sum(
        torch.tensor([capture.loss * weight], dtype=torch.float64, device=capture.device), group
    )
    return replace(
        capture,
        layers=layers,
        grad=grad,
        columns=all_gather_dim(capture.columns, sizes, 1, group),
        scale=scale,
        loss=float(loss.item()),
        output=all_gather_dim(capture.output, sizes, 0, group),
        grad_ratio=None if capture.grad_ratio is None else capture.grad_ratio * weight,
    )


# ----------------------------------------------------------------------------------
# block-wise Gram
# ----------------------------------------------------------------------------------


def gram_block_row(
    local: Capture, gathered: Capture, scheme: str = "auto", layers: list[int] | None = None
) -> Tensor:
    """This rank's block row of ``K = UᵀU``: ``(N_r C', N C')`` in float64.

    Args:
        local: This rank's capture (its rows).
        gathered: :func:`gather_capture` of ``local`` (all columns).
        scheme: ``"auto"`` (per layer, as :func:`~curvlab.curvature.gram.choose_scheme`
            would pick for the whole batch), ``"pairs"`` or ``"per_sample"``.
        layers: Indices of the layers to include (default: all).
    """
    check_choice("scheme", scheme, SCHEMES)
    dtype = SOLVE_DTYPE  # Grams are assembled in float64, as ExactFisher's
    c = local.num_columns
    out = torch.zeros(
        local.batch_size * c, gathered.batch_size * c, dtype=SOLVE_DTYPE, device=local.device
    )
    picks = range(len(local.layers)) if layers is None else layers
    for i in picks:
        lc, gc = local.layers[i], gathered.layers[i]
        _, big_n, t, o = gc.e.shape
        sch = scheme
        if sch == "auto":
            sch = choose_scheme(big_n, c, t, gc.a.shape[-1], o)
        out += gram_rows(lc.a.to(dtype), lc.e.to(dtype), gc.a.to(dtype), gc.e.to(dtype), sch)
    return out


def distributed_gram(
    local: Capture,
    group=None,
    gathered: Capture | None = None,
    scheme: str = "auto",
    layers: list[int] | None = None,
) -> Tensor:
    """The global ``K = UᵀU`` (``(N C', N C')``, float64) on every rank, block-row-wise.

    Rank ``r`` computes ``K[rows of r, :]`` (:func:`gram_block_row`), then the block rows
    are all-gathered.  Pass ``gathered`` to reuse a :func:`gather_capture` result.
    """
    if gathered is None:
        gathered = gather_capture(local, group)
    row = gram_block_row(local, gathered, scheme, layers)
    sizes = all_gather_sizes(local.batch_size, local.device, group)
    return all_gather_dim(row, [n * local.num_columns for n in sizes], 0, group)


class DistributedExactFisher(ExactFisher):
    """:class:`~curvlab.ExactFisher` of the concatenated batch, its work split over ranks.

    The Gram is assembled block-row-wise (:func:`distributed_gram`); ``Uᵀ v`` is computed
    for this rank's rows and all-gathered; ``U c`` is this rank's partial sum,
    all-reduced.  The ``(N C')²`` Cholesky factorisation runs on every rank (it is
    ``O((N C')³)`` with no ``P`` in it).  Per-layer ``blocks``, ``to_dense`` and
    ``per_sample_gradients`` read the gathered capture without communicating.

    Args:
        capture: This rank's capture of its shard.
        group: Process group (default: the world).
        memory_budget, scheme: As for :class:`~curvlab.ExactFisher`.
        reduction: The loss reduction (inferred when omitted, see :func:`gather_capture`).
    """

    def __init__(
        self,
        capture: Capture,
        group=None,
        memory_budget: int | None = None,
        scheme: str = "auto",
        reduction: str | None = None,
    ):
        self.group, self.local = group, capture
        gathered = gather_capture(capture, group, reduction)
        super().__init__(gathered, memory_budget, scheme)
        sizes = all_gather_sizes(capture.batch_size, capture.device, group)
        me = rank(group)
        c = capture.num_columns
        self._row_sizes = [n * c for n in sizes]
        self._rows = slice(sum(sizes[:me]) * c, sum(sizes[: me + 1]) * c)

    @property
    def global_capture(self) -> Capture:
        """The gathered capture of the whole batch (its ``grad`` is the global gradient)."""
        return self._capture

    @property
    def gram(self) -> Tensor:
        if self._gram is None:
            self._gram = distributed_gram(self.local, self.group, self._capture, self._scheme)
        return self._gram

    def _ut(self, v: Tensor) -> Tensor:
        mine = torch.zeros(self._rows.stop - self._rows.start, dtype=SOLVE_DTYPE, device=v.device)
        for lc, mat in zip(self.local.layers, self._split(v.to(SOLVE_DTYPE))):
            av = lc.a.to(SOLVE_DTYPE) @ mat.T  # (N_r, T, d_out)
            mine += torch.einsum("cnto,nto->nc", lc.e.to(SOLVE_DTYPE), av).reshape(-1)
        return all_gather_dim(mine, self._row_sizes, 0, self.group)

    def _u(self, coef: Tensor) -> Tensor:
        cc = coef[self._rows].to(SOLVE_DTYPE).view(self.local.batch_size, -1)
        mine = self._contract(
            lambda lc: torch.einsum("nc,cnto->nto", cc, lc.e.to(SOLVE_DTYPE)), self.local.layers
        )
        return all_reduce_sum(mine, self.group)


# ----------------------------------------------------------------------------------
# Kronecker factors
# ----------------------------------------------------------------------------------


def kfac_factors(
    capture: Capture, group=None, approx: str = "expand", reduction: str | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer ``(A, G)`` of the concatenated batch (float64), on every rank.

    Each rank sums ``ā āᵀ`` and ``e eᵀ`` over its shard (in the compute dtype, as
    :mod:`curvlab.curvature.factors` does); the sums are all-reduced in float64 and
    normalised with the global counts: ``A = Σ ā āᵀ / (N T)`` (``/ N`` for
    ``"reduce"``), ``G = s Σ e eᵀ`` with the global scale ``s``.
    """
    check_choice("kfac_approx", approx, KFAC_APPROX)
    sizes = all_gather_sizes(capture.batch_size, capture.device, group)
    red = _reduction(capture, sizes, reduction, group)
    total = sum(sizes)
    scale = 1.0 / total if red == "mean" else 1.0
    out = {}
    for lc in capture.layers:
        a_sum, rows = input_factor_sum(lc.a, approx)
        g_sum = grad_factor(lc.e, 1.0, approx)
        sums = all_reduce_sum(torch.cat([a_sum.reshape(-1), g_sum.reshape(-1)]), group)
        d_a, d_e = a_sum.shape[0], g_sum.shape[0]
        big_a = sums[: d_a * d_a].view(d_a, d_a) / (total * rows)
        big_g = scale * sums[d_a * d_a :].view(d_e, d_e)
        out[lc.name] = (big_a, big_g)
    return out


class DistributedKFAC(KFAC):
    """:class:`~curvlab.KFAC` of the concatenated batch from all-reduced factors.

    Solve with the global gradient (``gather_capture(...).grad`` or
    :attr:`DistributedExactFisher.global_capture`).  Arguments as for KFAC, plus the
    process ``group`` and the loss ``reduction`` (inferred when omitted).
    """

    def __init__(
        self,
        capture: Capture,
        group=None,
        damping_mode: str = "heuristic",
        kfac_approx: str = "expand",
        reduction: str | None = None,
    ):
        check_choice("damping_mode", damping_mode, DAMPING_MODES)
        factors = kfac_factors(capture, group, kfac_approx, reduction)
        dtype = compute_dtype(capture.dtype)
        self.damping_mode, self.kfac_approx = damping_mode, kfac_approx
        LayerwiseCurvature.__init__(
            self,
            {
                lc.name: KFACBlock(LayerFactors(lc.info, *factors[lc.name]), damping_mode, dtype)
                for lc in capture.layers
            },
        )


class DistributedFOOF(LayerwiseCurvature):
    """:class:`~curvlab.FOOF` (``⊕ A ⊗ I``) of the concatenated batch from all-reduced ``A``
    (layers without Kronecker factors: their exact block, the all-reduced ``G``)."""

    def __init__(self, capture: Capture, group=None, reduction: str | None = None):
        factors = kfac_factors(capture, group, "expand", reduction)
        dtype = compute_dtype(capture.dtype)
        super().__init__(
            {
                lc.name: foof_block(lc.info, factors[lc.name][0], dtype)
                if lc.info.kronecker
                else exact_layer_block(lc.info, factors[lc.name][1], dtype)
                for lc in capture.layers
            }
        )

"""Checks of the KFC assumptions (Grosse & Martens 2016) for every conv layer.

For a conv layer with patches ``ā_nt`` (``d``), output-gradient columns ``e_nct``
(``o``) at output locations ``t`` and the Fisher scale ``s``, the exact block in the
row-major ``[W | b]`` layout is

    F = s Σ_{n,c} vec(Γ_nc) vec(Γ_nc)ᵀ,   Γ_nc = Σ_t e_nct ā_ntᵀ,

and the approximations (``⊗`` in the ``kron(G-side, A-side)`` order of the layout):

* IAD (independent activations and derivatives):
  ``F_IAD = Σ_{t,t'} Ē_tt' ⊗ Ā_tt'`` with ``Ā_tt' = mean_n ā_nt ā_nt'ᵀ`` and
  ``Ē_tt' = s Σ_{n,c} e_nct e_nct'ᵀ``;
* IAD + SH (spatial homogeneity): ``Ā_tt'``, ``Ē_tt'`` replaced by their averages
  ``Ω(δ)``, ``Γ(δ)`` over all location pairs with the same offset ``δ = t' − t``:
  ``F_SH = Σ_δ n_δ Γ(δ) ⊗ Ω(δ)`` (``n_δ`` pairs with offset ``δ``);
* KFC = IAD + SH + SUD (spatially uncorrelated derivatives, ``Γ(δ) = 0`` for
  ``δ ≠ 0``): ``|T| Γ(0) ⊗ Ω(0) = G ⊗ A``, KFAC's "expand" block.

Metrics ``"iad"``, ``"iad_sh"``, ``"kfc"`` are the relative Frobenius errors
``‖F − F_x‖ / ‖F‖``.  These are dense ``(o d) x (o d)`` matrices; above
``max_params`` entries (or when ``|T|² (o d)²`` exceeds ``max_flops``) the check runs
on a principal submatrix: evenly spaced output channels and patch entries (every
approximation commutes with that restriction; ``extra["block_params"]`` says how
many were kept).

Spatial correlations against the Chebyshev distance ``r`` of location pairs
(metrics ``"corr_activations"`` — SUA — and ``"corr_derivatives"`` — SUD — with
index ``r``): ``mean_{pairs at distance r} E[x_t · x_t'] / mean_t E[x_t · x_t]`` for
mean-centred activations (without the homogeneous 1) and for the raw
output-gradient columns.  Patches of neighbouring locations overlap, so activation
correlations at small ``r`` are large by construction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.compare.analysis import Analysis
from curvlab.config import options
from curvlab.curvature.gram import per_sample_gradients
from curvlab.errors import ShapeError
from curvlab.numerics import SOLVE_DTYPE
from curvlab.records import Record

MAX_LOCATIONS = 1024
"""Conv layers with more output locations are skipped (the location-pair maps are ``|T|²``)."""


def offset_index(shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Location-pair offsets on a grid of ``shape`` (row-major locations).

    Returns:
        ``index (T, T)``: offset id of each pair ``(t, t')``; ``counts (n_offsets,)``:
        pairs per offset; ``distance (n_offsets,)``: Chebyshev length of each offset.
        The zero offset has id ``(n_offsets - 1) // 2``.
    """
    sizes = [int(s) for s in shape]
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij"), -1
    ).reshape(-1, len(sizes))
    diff = coords.unsqueeze(0) - coords.unsqueeze(1)  # (T, T, k): t' − t
    index = torch.zeros(diff.shape[:2], dtype=torch.long)
    for axis, size in enumerate(sizes):
        index = index * (2 * size - 1) + diff[..., axis] + size - 1
    counts = torch.bincount(index.reshape(-1), minlength=math.prod(2 * s - 1 for s in sizes))
    grids = torch.meshgrid(*[torch.arange(1 - s, s) for s in sizes], indexing="ij")
    distance = torch.stack([g.abs() for g in grids], -1).reshape(-1, len(sizes)).amax(-1)
    return index, counts, distance


def _evenly(n: int, k: int) -> Tensor:
    return torch.linspace(0, n - 1, k, dtype=SOLVE_DTYPE).round().long()


def kept_sizes(
    d_out: int, d_in: int, locations: int, max_params: int, max_flops: float
) -> tuple[int, int]:
    """Output channels and patch entries kept for the dense check (see the module docstring)."""
    limit = max(1, min(max_params, int(math.sqrt(max_flops) / locations)))
    if d_out * d_in <= limit:
        return d_out, d_in
    ratio = math.sqrt(limit / (d_out * d_in))
    o = min(d_out, max(1, round(d_out * ratio)))
    return o, min(d_in, max(1, limit // o))


def kfc_matrices(a: Tensor, e: Tensor, scale: float, shape: Sequence[int]) -> dict[str, Tensor]:
    """The exact block and its IAD, IAD+SH and KFC approximations, dense, float64.

    Args:
        a: Patches ``(N, T, d)``.
        e: Output-gradient columns ``(C', N, T, o)``.
        scale: The Fisher scale ``s``.
        shape: Spatial output shape with ``∏ shape = T`` (row-major locations).

    Returns:
        ``{"exact", "iad", "iad_sh", "kfc"}`` -> ``(o d, o d)`` in ``[W | b]`` row-major order.
    """
    a, e = a.to(SOLVE_DTYPE), e.to(SOLVE_DTYPE)
    n, t, d = a.shape
    o = e.shape[-1]
    if math.prod(shape) != t:
        raise ShapeError(f"spatial shape {tuple(shape)} does not have T = {t} locations")
    index, counts, _ = offset_index(shape)
    index, counts = index.to(a.device), counts.to(a.device, SOLVE_DTYPE)
    iad = a.new_zeros(o * o, d * d)
    sum_e = a.new_zeros(counts.numel(), o * o)
    sum_a = a.new_zeros(counts.numel(), d * d)
    step = max(1, options.chunk_bytes // (8 * t * (d * d + o * o + n * (d + o))))
    for i in range(0, t, step):
        abar = torch.einsum("ntj,nul->tujl", a[:, i : i + step], a).reshape(-1, d * d) / n
        ebar = scale * torch.einsum("cnti,cnuk->tuik", e[:, :, i : i + step], e).reshape(-1, o * o)
        iad += ebar.T @ abar
        pairs = index[i : i + step].reshape(-1)
        sum_e.index_add_(0, pairs, ebar)
        sum_a.index_add_(0, pairs, abar)
    gamma, omega = sum_e / counts.unsqueeze(1), sum_a / counts.unsqueeze(1)
    zero = (counts.numel() - 1) // 2
    grads = per_sample_gradients(a, e.permute(1, 0, 2, 3)).reshape(-1, o * d)

    def layout(m: Tensor) -> Tensor:  # [(i,k),(j,l)] -> [(i,j),(k,l)]
        return m.reshape(o, o, d, d).permute(0, 2, 1, 3).reshape(o * d, o * d)

    return {
        "exact": scale * grads.T @ grads,
        "iad": layout(iad),
        "iad_sh": layout((gamma * counts.unsqueeze(1)).T @ omega),
        "kfc": layout(t * torch.outer(gamma[zero], omega[zero])),
    }


def kfc_errors(a: Tensor, e: Tensor, scale: float, shape: Sequence[int]) -> dict[str, float]:
    """``‖F − F_x‖ / ‖F‖`` for ``x`` in ``iad``, ``iad_sh``, ``kfc`` (see :func:`kfc_matrices`)."""
    mats = kfc_matrices(a, e, scale, shape)
    exact = mats.pop("exact")
    norm = float(exact.norm())
    return {
        k: float((exact - m).norm()) / norm if norm > 0 else float("nan") for k, m in mats.items()
    }


def spatial_correlation(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Normalised spatial correlation against Chebyshev distance, ``(max distance + 1,)``.

    Args:
        x: ``(B, T, k)`` features per example and location (centre them first if wanted).
        shape: Spatial shape with ``∏ shape = T``.
    """
    x = x.to(SOLVE_DTYPE)
    t = x.shape[1]
    s = torch.einsum("btk,buk->tu", x, x)
    index, counts, distance = offset_index(shape)
    per_offset = torch.bincount(
        index.reshape(-1), weights=s.reshape(-1).cpu(), minlength=counts.numel()
    )
    radius = int(distance.max())
    sums = torch.zeros(radius + 1, dtype=SOLVE_DTYPE).index_add_(0, distance, per_offset)
    pairs = torch.zeros(radius + 1, dtype=SOLVE_DTYPE).index_add_(0, distance, counts.double())
    base = s.diagonal().sum().cpu() / t
    return (sums / pairs) / base if base > 0 else torch.full_like(sums, float("nan"))


def kfc_check_records(
    analysis: Analysis,
    spatial_shapes: dict[str, tuple] | None = None,
    max_params: int = 1536,
    max_flops: float = 4e9,
) -> list[Record]:
    """Section ``"kfc_check"`` for every conv layer of the capture (none: no records).

    Args:
        analysis: The captured problem.
        spatial_shapes: Output spatial shape per conv layer (default: the capture's
            :attr:`~curvlab.capture.LayerCapture.locations`).
        max_params: Largest block (entries of ``[W | b]``) checked densely.
        max_flops: Bound on ``|T|² (o d)²``, the cost of the IAD sum.
    """
    capt = analysis.capture
    convs = [lc for lc in capt.layers if lc.info.convolutional]
    if not convs:
        return []
    if spatial_shapes is None:
        spatial_shapes = {lc.name: lc.locations for lc in convs}
    records = []
    for lc in convs:
        shape = spatial_shapes[lc.name]
        n, t, d = lc.a.shape
        if t > MAX_LOCATIONS:
            warnings.warn(
                f"KFC checks skip layer '{lc.name}': {t} output locations exceed "
                f"{MAX_LOCATIONS}; use smaller inputs",
                stacklevel=2,
            )
            continue
        o = lc.info.d_out
        keep_o, keep_d = kept_sizes(o, d, t, max_params, max_flops)
        a = lc.a[..., _evenly(d, keep_d).to(lc.a.device)]
        e = lc.e[..., _evenly(o, keep_o).to(lc.e.device)]
        extra = {"block_params": keep_o * keep_d, "subsampled": keep_o * keep_d < o * d}
        for metric, value in kfc_errors(a, e, capt.scale, shape).items():
            records.append(
                Record("kfc_check", metric, "kfc", value, lc.name, "exact", extra=dict(extra))
            )
        acts = lc.a[..., : lc.info.d_in]
        acts = acts - acts.mean(dim=(0, 1))
        derivs = lc.e.reshape(-1, t, o)
        for metric, x in (("corr_activations", acts), ("corr_derivatives", derivs)):
            for r, value in enumerate(spatial_correlation(x, shape).tolist()):
                records.append(Record("kfc_check", metric, "kfc", value, lc.name, index=r))
    return records

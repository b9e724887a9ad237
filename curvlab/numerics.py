"""Dtype policy and small numerical helpers shared by the curvature objects.

Policy (DESIGN.md): Kronecker factors are accumulated in the *compute dtype* — the
model's dtype, or float32 for half/bfloat16 models; every solve and eigendecomposition
runs in float64 (``SOLVE_DTYPE``), and so does the vector algebra around a Woodbury
solve together with its Gram matrix (:mod:`curvlab.curvature.exact`).  Results return
in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvlab.errors import NonFiniteError, OptionError, ShapeError, SingularMatrixError

SOLVE_DTYPE = torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for accumulating statistics of a model in ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# A symmetric product is formed from its lower block triangle: with k row blocks, (k + 1) / 2k
# of the full product's work.  At most 8 blocks of at least 64 rows (smaller products lose
# more in matmul efficiency than they save).
SYMMETRIC_BLOCKS, SYMMETRIC_MIN_ROWS = 8, 64


def symmetric_block_rows(m: int) -> int:
    """Rows per block of :func:`symmetric_mm` for an ``m x m`` result."""
    return max(-(-m // SYMMETRIC_BLOCKS), SYMMETRIC_MIN_ROWS)


def symmetric_mm(x: Tensor, block_rows: int | None = None) -> Tensor:
    """``x xᵀ`` for ``x (M, d)``, computed on its lower block triangle and mirrored.

    Args:
        x: Rows ``(M, d)`` (any strides, e.g. the transpose of a data matrix).
        block_rows: Rows per block (default :func:`symmetric_block_rows`).
    """
    m = x.shape[0]
    step = symmetric_block_rows(m) if block_rows is None else block_rows
    out = x.new_empty(m, m)
    for i in range(0, m, step):
        j = min(i + step, m)
        torch.mm(x[i:j], x[:j].T, out=out[i:j, :j])
        out[:i, i:j] = out[i:j, :i].T
    return out


# Row count from which :func:`long_tmm` splits its sum in two.
LONG_ROWS = 4096


def long_tmm(r: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``rᵀ x`` ``(o, d)`` for ``r (K, o)``, ``x (K, d)`` (any strides), e.g. a layer's
    gradient ``Σ_nt g_nt ā_ntᵀ`` from its rows over all samples and locations.

    For long sums (``K ≥ LONG_ROWS``, even) the two halves of the rows are multiplied as
    one batched product and added: 1.05-1.22x faster on 2 cores than one product whose
    long sum the threads share (benchmarks/RESULTS.md Q5), and the same up to rounding.
    """
    k = r.shape[0]
    if k < LONG_ROWS or k % 2:
        return torch.mm(r.T, x, out=out)
    halves = torch.bmm(r.view(2, k // 2, -1).mT, x.view(2, k // 2, -1))
    return torch.sum(halves, dim=0, out=out)


def check_finite(x: Tensor, what: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``x`` has NaN or Inf entries.

    The sum is checked first (one cheap pass); only when it is not finite are the
    entries inspected, so an overflowing sum of finite entries raises nothing.
    """
    if torch.isfinite(x.sum()) or torch.isfinite(x).all():
        return
    bad = (~torch.isfinite(x)).sum().item()
    raise NonFiniteError(f"{what} contains {bad} NaN/Inf value(s). {hint}".strip())


def check_vector(v: Tensor, size: int, what: str = "vector") -> None:
    """Validate a flat vector of length ``size`` (DESIGN.md layout)."""
    if not isinstance(v, Tensor):
        raise ShapeError(f"{what} must be a torch.Tensor, got {type(v).__name__}.")
    if v.dim() != 1 or v.shape[0] != size:
        raise ShapeError(
            f"{what} must be a flat vector of shape ({size},) in the captured parameter "
            f"layout, got shape {tuple(v.shape)}. Flatten per-parameter tensors with "
            "torch.cat([p.flatten() for p in params])."
        )
    check_finite(v, what)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the valid ``choices``."""
    if value not in choices:
        raise OptionError(f"{name}={value!r} is unknown; choose one of {', '.join(choices)}.")


def check_damping(damping: float, allow_zero: bool = True) -> float:
    """Validate a damping value: finite, non-negative (positive unless ``allow_zero``)."""
    lam = float(damping)
    if not torch.isfinite(torch.tensor(lam)) or lam < 0 or (lam == 0 and not allow_zero):
        need = "≥ 0" if allow_zero else "> 0"
        raise SingularMatrixError(f"damping must be finite and {need}, got {damping!r}.")
    return lam


def require_positive(eigs: Tensor, what: str) -> None:
    """Raise :class:`SingularMatrixError` unless all ``eigs`` are safely positive."""
    scale = eigs.abs().max().clamp_min(torch.finfo(eigs.dtype).tiny)
    tol = eigs.shape[0] * torch.finfo(eigs.dtype).eps * scale
    if eigs.min() <= tol:
        raise SingularMatrixError(
            f"{what} is singular (smallest eigenvalue {eigs.min().item():.3e}); pass a damping > 0."
        )

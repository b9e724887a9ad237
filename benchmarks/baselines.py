"""The exact damped natural gradient ``(F + λI)⁻¹ g`` computed three ways.

* :func:`curvlab_ng`: ``curvlab.capture(..., gradient=False)`` +
  ``ExactFisher(capt).natural_gradient(λ)`` (the fast path: works from the gradient's
  output rows); :func:`curvlab_solve_ng`: ``curvlab.capture`` +
  ``ExactFisher(capt).solve(capt.grad, λ)`` (the generic solve, for comparison);
  ``curvlab_ng(..., gradient=True)``: the same default capture + ``natural_gradient``.
* :func:`materialised_ng`: per-sample (per-column) gradients ``Uᵀ`` materialised with
  ``torch.func`` (``vmap`` over samples of a ``vjp`` with the ``C'`` Fisher columns as
  cotangents), then the dense solve in the small space:
  ``(g − U (λ/s I + UᵀU)⁻¹ Uᵀ g) / λ`` with a float64 Cholesky.  Forming the ``P x P``
  Fisher is out of the question for the MLP (P = 2.8M), so this is the strongest
  "materialise and solve" baseline.
* :func:`cg_ng`: curvlinops' ``GGNLinearOperator`` (``exact``), ``FisherMCLinearOperator``
  (``mc``) or ``EFLinearOperator`` (``empirical``) plus conjugate gradients on
  ``(F + λI) x = g`` to a relative residual ``‖r‖ ≤ 10⁻⁶ ‖g‖``.

The Fisher columns (which labels, which square root of the loss Hessian) follow
curvlab's conventions (``curvlab.losses.fisher_columns``) so that the materialised
result can be checked against curvlab's; for ``mc`` both draw the same labels from
generators with the same seed.  curvlinops draws its own MC labels.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

import curvlab
from curvlab.losses import fisher_columns, loss_scales, loss_value

MiB = 2**20


def _generator(fisher: str, seed: int, device: torch.device) -> torch.Generator | None:
    if fisher != "mc":
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _capture(model, loss_fn, x, y, fisher: str, seed: int, gradient: bool) -> curvlab.Capture:
    return curvlab.capture(
        model,
        loss_fn,
        x,
        y,
        fisher=fisher,
        generator=_generator(fisher, seed, x.device),
        gradient=gradient,
    )


def curvlab_ng(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher: str,
    damping: float,
    seed: int = 0,
    gradient: bool = False,
) -> Tensor:
    """curvlab end to end: one capture and ``ExactFisher.natural_gradient``.

    ``gradient=True`` runs the default capture (which also forms ``capt.grad``), the one
    :func:`curvlab_solve_ng` runs, so that the two routes can be compared after the same
    capture."""
    capt = _capture(model, loss_fn, x, y, fisher, seed, gradient)
    return curvlab.ExactFisher(capt).natural_gradient(damping)


def curvlab_solve_ng(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher: str,
    damping: float,
    seed: int = 0,
) -> Tensor:
    """curvlab end to end through the generic ``solve(capt.grad, λ)``."""
    capt = _capture(model, loss_fn, x, y, fisher, seed, gradient=True)
    return curvlab.ExactFisher(capt).solve(capt.grad, damping)


def materialised_bytes(n: int, columns: int, params: int, itemsize: int = 4) -> int:
    """Bytes the materialised baseline holds at its peak (``Uᵀ`` plus its Gram)."""
    rows = n * columns
    return rows * params * itemsize + rows * rows * (8 + itemsize)


def materialised_ng(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher: str,
    damping: float,
    seed: int = 0,
    chunk_bytes: int = 256 * MiB,
) -> Tensor:
    """Per-column gradients materialised with torch.func, then the small dense solve."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in params.values())
    out = model(x)
    loss = loss_value(loss_fn, out, y)
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[k] for k in names] + [out])
    g = torch.cat([t.reshape(-1) for t in grads[:-1]]).detach()
    f = out.detach()
    cols = fisher_columns(
        loss_fn, f, y, grads[-1].detach(), fisher, 1, _generator(fisher, seed, x.device)
    )  # (C', N, C)
    scale, _ = loss_scales(loss_fn, f, y)
    c, n = cols.shape[0], cols.shape[1]
    cols_n = cols.transpose(0, 1).to(f.dtype)  # (N, C', C)

    def one_sample(xn: Tensor, gn: Tensor) -> Tensor:
        def fwd(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)

        _, pull = vjp(fwd, params)
        (per_col,) = vmap(pull)(gn)  # name -> (C', *shape)
        return torch.cat([per_col[k].reshape(gn.shape[0], -1) for k in names], dim=1)

    u = torch.empty(n * c, n_params, dtype=f.dtype, device=f.device)
    step = max(1, chunk_bytes // (3 * c * n_params * f.element_size()))
    for i in range(0, n, step):
        j = min(i + step, n)
        u[i * c : j * c] = vmap(one_sample)(x[i:j], cols_n[i:j]).reshape((j - i) * c, n_params)
    k = (u @ u.T).double()
    k.diagonal().add_(damping / scale)
    chol = torch.linalg.cholesky(k)
    coef = torch.cholesky_solve((u @ g).double().unsqueeze(1), chol).squeeze(1)
    return (g - u.T @ coef.to(f.dtype)) / damping


def cg_ng(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    fisher: str,
    damping: float,
    tol: float = 1e-6,
    max_iter: int = 100_000,
    time_limit: float | None = None,
) -> tuple[Tensor, dict]:
    """curvlinops' curvature operator + CG on ``(F + λI) x = g`` (x₀ = 0).

    Returns the solution and ``{"iters", "rel_residual" (recursive), "converged"}``.
    Dot products are accumulated in float64; the operator runs in the model's dtype.
    """
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"exact": GGNLinearOperator, "mc": FisherMCLinearOperator, "empirical": EFLinearOperator}[
        fisher
    ]
    op = cls(model, loss_fn, params, [(x, y)], check_deterministic=False)
    for p in params:
        p.grad = None
    loss_fn(model(x), y).backward()
    b = torch.cat([p.grad.reshape(-1) for p in params]).detach()

    def dot(u: Tensor, v: Tensor) -> float:
        return float(torch.dot(u.double(), v.double()))

    start = time.perf_counter()
    sol = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = dot(r, r)
    target = (tol * math.sqrt(dot(b, b))) ** 2
    iters = 0
    while rr > target and iters < max_iter:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        ad = op @ d + damping * d
        alpha = rr / dot(d, ad)
        sol.add_(d, alpha=alpha)
        r.sub_(ad, alpha=alpha)
        rr_new = dot(r, r)
        d.mul_(rr_new / rr).add_(r)
        rr = rr_new
        iters += 1
    rel = math.sqrt(rr / max(dot(b, b), 1e-300))
    return sol, {"iters": iters, "rel_residual": rel, "converged": rr <= target}


def relative_error(x: Tensor, ref: Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64."""
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))

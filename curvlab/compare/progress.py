"""Progress per update: the relative decrease of the mini-batch loss after one step.

For a method's direction ``d`` (``solve(g, λ)``) and learning rate ``η``:

    relative_loss_decrease = (L(θ) − L(θ − η d)) / L(θ)

on the captured mini-batch (positive: the loss went down).  The loss at shifted
parameters is evaluated with :func:`torch.func.functional_call` on cloned buffers,
so neither the model's parameters nor its buffers (e.g. batch-norm statistics) change.

Optionally every method's step is rescaled per layer to the norm of a reference
method's step (``d_l ← d_l · ‖r_l‖ / ‖d_l‖``), so only the directions differ — as
Benzing (2022, Fig. 4C) does for FOOF against KFAC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.compare.analysis import Analysis
from curvlab.losses import loss_value
from curvlab.records import Record


def loss_at(analysis: Analysis, step: Tensor) -> float:
    """The mini-batch loss at ``θ − step`` (``step``: flat vector), the model untouched."""
    return shifted_loss(
        analysis.model,
        analysis.loss_fn,
        analysis.inputs,
        analysis.targets,
        analysis.capture.params,
        step,
    )


def shifted_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    params: Sequence[Tensor],
    step: Tensor,
    theta: Tensor | None = None,
) -> float:
    """``loss_fn(model(inputs), targets)`` at ``θ − step``, the model untouched.

    ``step`` (and ``theta``, the flat values ``θ`` of ``params``, default their current
    values) are flat over ``params`` in that order; other parameters keep their values.
    Buffers are cloned, so e.g. batch-norm running statistics do not change.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    state = {name: b.clone() for name, b in model.named_buffers()}
    offset = 0
    for p in params:
        part = step[offset : offset + p.numel()].reshape(p.shape)
        base = p.detach() if theta is None else theta[offset : offset + p.numel()].view_as(p)
        state[names[id(p)]] = base.to(p.device, p.dtype) - part.to(p.device, p.dtype)
        offset += p.numel()
    with torch.no_grad():
        out = functional_call(model, state, (inputs,))
        return float(loss_value(loss_fn, out, targets))


def rescale_per_layer(analysis: Analysis, d: Tensor, to: Tensor) -> Tensor:
    """``d`` with each layer's part rescaled to the norm of ``to``'s part (zero parts stay)."""
    out = d.clone()
    for lc in analysis.capture.layers:
        part, target = d[lc.info.slice], to[lc.info.slice]
        norm = part.norm()
        if norm > 0:
            out[lc.info.slice] = part * (target.norm() / norm)
    return out


def progress_records(
    analysis: Analysis,
    methods: Sequence[str],
    dampings: Sequence[float],
    lrs: Sequence[float],
    rescale_to: str | None = None,
) -> list[Record]:
    """Section ``"progress"``.

    Metrics per method and λ: ``"relative_loss_decrease"`` for each learning rate
    (``extra["lr"]``) and ``"best_relative_loss_decrease"``, the best over ``lrs``
    (``extra["lr"]`` = the learning rate that achieved it, ``None`` with a NaN value when
    every step gives a non-finite loss; ``extra["lr_at_grid_edge"]`` flags a best
    learning rate at either end of the grid, where a wider grid may do better).  With
    ``rescale_to``, the same again with steps rescaled per layer to that method's norms
    (``reference = rescale_to``); unrescaled records have no reference.
    """
    capt = analysis.capture
    base = loss_at(analysis, capt.grad.new_zeros(capt.num_params, dtype=torch.float64))
    records = []
    for lam in dampings:
        for reference in [None] if rescale_to is None else [None, rescale_to]:
            target = None if reference is None else analysis.direction(reference, lam)
            for m in methods:
                d = analysis.direction(m, lam)
                if target is not None:
                    d = rescale_per_layer(analysis, d, target)
                best, best_lr = float("nan"), None
                for lr in lrs:
                    value = (base - loss_at(analysis, lr * d)) / base if base else float("nan")
                    records.append(
                        Record(
                            "progress",
                            "relative_loss_decrease",
                            m,
                            value,
                            reference=reference,
                            damping=lam,
                            extra={"lr": lr},
                        )
                    )
                    if math.isfinite(value) and not value <= best:
                        best, best_lr = value, lr
                records.append(
                    Record(
                        "progress",
                        "best_relative_loss_decrease",
                        m,
                        best,
                        reference=reference,
                        damping=lam,
                        extra={"lr": best_lr, "lr_at_grid_edge": best_lr in (min(lrs), max(lrs))},
                    )
                )
    return records

"""Progress per update along a KFAC optimizer's own trajectory (Benzing 2022, Fig. 4C).

At a checkpoint ``k`` the KFAC optimizer (:class:`curvlab.optim.KFAC`: its moving-average
factors, its Fisher type, momentum, clipping and learning rate) takes its step on the
mini-batch ``(x_k, y_k)``; the step it took is read from the parameters,
``Δ = θ_k − θ_{k+1}`` (flat).  Then, from the optimizer's factors in use for that step
(``Â``, ``Ĝ``, KFAC's ``π`` of each layer) and the mini-batch gradient ``g`` at ``θ_k``,
each other method's direction is formed:

* ``"foof-kfac-damping"``: ``∇W (Â + π√λ I)⁻¹`` (the FOOF of Fig. 3/4, "KFAC without G");
* ``"foof"``: ``∇W (Â + λI)⁻¹``;
* ``"sgd"``: ``g``;

and rescaled per layer to the norm of KFAC's step, ``d_l ← d_l ‖Δ_l‖ / ‖d_l‖`` (so the
methods differ only in direction; KFAC's learning rate is inside ``Δ``).  Every method's
progress is the relative decrease of the loss on the same mini-batch,

    (L(θ_k) − L(θ_k − step)) / L(θ_k),

with ``step = Δ`` for ``"kfac"``.  Records: section ``"step_progress"``, metric
``"relative_loss_decrease"``, ``index = k``, ``reference = "kfac"``, ``damping = λ``.
:func:`step_progress_summary` reduces them to the median ratio to KFAC and the fraction
of checkpoints where each method is ahead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from curvlab.compare.progress import shifted_loss
from curvlab.curvature.foof import FOOFBlock
from curvlab.errors import OptionError
from curvlab.independence import require_deterministic
from curvlab.losses import loss_value
from curvlab.optim.kfac import KFAC
from curvlab.records import Record

SECTION = "step_progress"
STEP_METHODS = ("foof-kfac-damping", "foof", "sgd")
"""Directions :func:`step_progress` can measure against KFAC's step."""


def step_progress(
    optimizer: KFAC,
    batches: Iterable[tuple[Tensor, Tensor]],
    every: int = 1,
    methods: Sequence[str] = ("foof-kfac-damping", "foof"),
) -> list[Record]:
    """Drive ``optimizer`` over ``batches`` and measure every ``every``-th step (step 0 on).

    Args:
        optimizer: The KFAC optimizer whose trajectory is followed (it is stepped here).
        batches: ``(inputs, targets)`` per step.
        every: Checkpoint spacing.
        methods: Directions compared with KFAC's step (:data:`STEP_METHODS`).

    Returns:
        The records of the module docstring, ``"kfac"`` first at each checkpoint; the
        unmeasured steps are taken as well.

    Raises:
        SampleCouplingError: Dropout in ``train()`` mode (each loss evaluation would draw
            new masks); call ``model.eval()`` or train without dropout.
    """
    if int(every) != every or every < 1:
        raise OptionError(f"every must be a positive integer, got {every!r}")
    unknown = [m for m in methods if m not in STEP_METHODS]
    if unknown:
        raise OptionError(f"unknown method '{unknown[0]}'; choose from {', '.join(STEP_METHODS)}")
    require_deterministic(optimizer.model, "step_progress")
    records: list[Record] = []
    for k, (inputs, targets) in enumerate(batches):
        if k % every:
            optimizer.step(inputs, targets)
        else:
            records += _checkpoint(optimizer, inputs, targets, k, methods)
    return records


def _flat_params(optimizer: KFAC) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in optimizer.param_groups[0]["params"]])


def _checkpoint(
    optimizer: KFAC, inputs: Tensor, targets: Tensor, k: int, methods: Sequence[str]
) -> list[Record]:
    """One step of ``optimizer`` and the records of every method at it."""
    model, loss_fn = optimizer.model, optimizer.loss_fn
    params = optimizer.param_groups[0]["params"]
    with torch.enable_grad():
        loss = loss_value(loss_fn, model(inputs), targets)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    before = _flat_params(optimizer).clone()
    optimizer.step(inputs, targets)
    taken = (before - _flat_params(optimizer)).to(torch.float64)
    lam = optimizer.param_groups[0]["damping"]
    steps = {"kfac": taken}
    for m in methods:
        steps[m] = _rescaled(optimizer, _direction(optimizer, m, grad, lam), taken)

    def shifted(step: Tensor) -> float:
        return shifted_loss(model, loss_fn, inputs, targets, params, step, theta=before)

    base = float(loss.detach())
    out = []
    for m, step in steps.items():
        value = (base - shifted(step)) / base if base else math.nan
        out.append(
            Record(
                SECTION,
                "relative_loss_decrease",
                m,
                value,
                reference="kfac",
                damping=lam,
                index=k,
                extra={"lr": optimizer.param_groups[0]["lr"]},
            )
        )
    return out


def _direction(optimizer: KFAC, method: str, grad: Tensor, lam: float) -> Tensor:
    """``method``'s direction from the optimizer's factors in use (float64, flat)."""
    if method == "sgd":
        return grad.to(torch.float64)
    blocks = []
    for info in optimizer.layers:
        factors = optimizer.factors[info.name]
        pi = factors.pi if method == "foof-kfac-damping" else None
        block = FOOFBlock(info, factors.eig_A, torch.float64, pi)
        blocks.append(block.solve(grad[info.slice], lam))
    return torch.cat(blocks)


def _rescaled(optimizer: KFAC, d: Tensor, to: Tensor) -> Tensor:
    """``d`` with each layer's part rescaled to the norm of ``to``'s (zero parts stay)."""
    out = d.clone()
    for info in optimizer.layers:
        norm = d[info.slice].norm()
        if norm > 0:
            out[info.slice] = d[info.slice] * (to[info.slice].norm() / norm)
    return out


def step_progress_summary(records: Sequence[Record], reference: str = "kfac") -> list[Record]:
    """Per method (``reference`` excluded), over the checkpoints of :func:`step_progress`:

    * ``"median_ratio"``: median of ``progress(method) / progress(reference)`` over the
      checkpoints where the reference decreased the loss;
    * ``"fraction_ahead"``: fraction of checkpoints with ``progress(method) > progress(
      reference)`` (``"fraction_behind"``: ``<``);
    * ``"checkpoints"``: their number.

    Records of section ``"step_progress"`` with ``reference`` set.
    """
    by_step: dict[int, dict[str, float]] = {}
    for r in records:
        if r.section == SECTION and r.metric == "relative_loss_decrease":
            by_step.setdefault(r.index, {})[r.method] = r.value
    methods = dict.fromkeys(m for row in by_step.values() for m in row if m != reference)
    out = []
    for m in methods:
        pairs = [(row[m], row[reference]) for row in by_step.values() if m in row]
        ratios = [a / b for a, b in pairs if b > 0]
        n = len(pairs)
        values = {
            "median_ratio": statistics.median(ratios) if ratios else math.nan,
            "fraction_ahead": sum(a > b for a, b in pairs) / n,
            "fraction_behind": sum(a < b for a, b in pairs) / n,
            "checkpoints": float(n),
        }
        out += [Record(SECTION, k, m, v, reference=reference) for k, v in values.items()]
    return out

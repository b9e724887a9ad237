"""Loss functions: scale conventions and the Fisher columns backpropagated by capture.

Outputs may carry positions: the model output ``f`` has shape ``(N, *P, K)`` (``K``
classes or output features, last; ``T = ∏P`` positions per sample, ``T = 1`` for
``(N, K)``).  For ``CrossEntropyLoss`` the class dimension is last and the targets are
``(N, *P)`` class indices; the loss is exactly ``loss_fn(f.flatten(0, -2),
y.flatten())`` (``ignore_index`` positions contribute nothing).  ``MSELoss`` and
``BCEWithLogitsLoss`` take targets of the output's shape and average over all entries.

Write ``L = s · Σ_n ℓ̃_n`` with ``ℓ̃_n = c · ℓ_n``, ``ℓ_n = Σ_t ℓ_nt`` the per-sample
loss summed over positions and outputs, and

* CE: ``s = 1/M`` for ``reduction="mean"`` with ``M`` the number of non-ignored
  positions in the batch (``M = N`` for ``(N, K)`` outputs without ignored targets),
  ``1`` for ``"sum"``; ``c = 1``;
* MSE/BCE: ``s = 1/N`` for ``"mean"``, ``c = 1/(T·K)`` (PyTorch averages over all
  entries); ``s = c = 1`` for ``"sum"``.

This is curvlinops' convention.  The curvature is then

    F = s · Σ_n Σ_c J_nᵀ g_nc g_ncᵀ J_n,

with output-shaped *columns* ``g_nc`` (``(C', N, *P, K)``):

* ``exact``: per position ``t`` and class ``j`` a column of a square root of the
  position's loss Hessian ``c ∇²_{f_nt} ℓ_nt``, zero at every other position
  (``C' = T·K``; the type-2 Fisher = GGN);
* ``mc``: ``√(c/S) ∇_f ℓ_n(f, ŷ)`` for ``S`` labels ``ŷ`` drawn from the model's
  predictive distribution *at every position* (categorical, Bernoulli, Gaussian with
  variance 1/2): one column per sample and draw (``C' = S``).  The cross-position
  terms vanish in expectation, so this is unbiased for the GGN;
* ``empirical``: per position (per token), ``√c ∇_{f_nt} ℓ_nt`` at the data label,
  zero elsewhere (``C' = T``), so that ``EF = s Σ_nt (√c ∇ℓ_nt)(√c ∇ℓ_nt)ᵀ`` as
  curvlinops' ``EFLinearOperator``, which flattens positions into the batch.

CrossEntropyLoss with probability targets ``y_n`` is ``ℓ_n = −Σ_k y_nk log p_nk``, whose
Hessian is ``m_n (diag p_n − p_n p_nᵀ)`` with the row mass ``m_n = Σ_k y_nk``: rows that do
not sum to one scale their sample's curvature.  The ``exact`` and ``mc`` columns carry
the factor ``√m_n`` (:func:`target_mass`); rows with negative mass (a concave loss) are
refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvlab.config import format_bytes, options
from curvlab.errors import MemoryBudgetError, ShapeError, UnsupportedModelError

FISHER_TYPES = ("mc", "exact", "empirical")
SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_loss(loss_fn: nn.Module) -> None:
    """Refuse losses (or loss options) whose Hessian curvlab does not model.

    Subclasses of the supported losses are accepted only when they keep the parent's
    computation: no override of ``forward`` and no forward hooks on the instance.
    """
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise UnsupportedModelError(
            f"loss {type(loss_fn).__name__} is not supported; use nn.CrossEntropyLoss, "
            "nn.MSELoss or nn.BCEWithLogitsLoss."
        )
    base = next(b for b in SUPPORTED_LOSSES if isinstance(loss_fn, b))
    if type(loss_fn).forward is not base.forward:
        raise UnsupportedModelError(
            f"loss {type(loss_fn).__name__} overrides {base.__name__}.forward; curvlab models "
            f"the Hessian of {base.__name__} itself and would silently read a different "
            f"loss. Use {base.__name__} (scale the result, not the loss, if needed)."
        )
    if loss_fn._forward_hooks or loss_fn._forward_pre_hooks:
        raise UnsupportedModelError(
            f"loss {type(loss_fn).__name__} has forward hooks, which may change its value; "
            "curvlab models the plain loss. Remove the hooks."
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise UnsupportedModelError(
            f"reduction={loss_fn.reduction!r} is not supported; use 'mean' or 'sum'."
        )
    extras = {
        "weight": getattr(loss_fn, "weight", None) is not None,
        "pos_weight": getattr(loss_fn, "pos_weight", None) is not None,
        "label_smoothing": getattr(loss_fn, "label_smoothing", 0.0) != 0.0,
    }
    used = [k for k, v in extras.items() if v]
    if used:
        raise UnsupportedModelError(
            f"{type(loss_fn).__name__} with {', '.join(used)} is not supported; "
            "use the loss without these options."
        )


def check_targets(loss_fn: nn.Module, output: Tensor, targets: Tensor) -> None:
    """Shape checks between the model output ``(N, *P, K)`` and the targets.

    Refuses a call that PyTorch would read differently from curvlab's class-last
    convention (CE outputs ``(N, C, *P)`` with class dimension 1), so that the loss
    capture differentiates is always the one ``loss_fn(output, targets)`` computes.
    """
    if output.dim() < 2:
        raise ShapeError(
            f"the model output must have shape (N, C) or (N, ..., C), got {tuple(output.shape)}."
        )
    n, k = output.shape[0], output.shape[-1]
    if targets.shape[0] != n:
        raise ShapeError(f"inputs give {n} outputs but targets have batch size {targets.shape[0]}.")
    if not isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.shape != output.shape:
            raise ShapeError(
                f"{type(loss_fn).__name__} targets must have the output's shape "
                f"{tuple(output.shape)}, got {tuple(targets.shape)}."
            )
        return
    if targets.dtype.is_floating_point:
        if output.dim() > 2:
            raise ShapeError(
                "CrossEntropyLoss with probability targets is supported for (N, C) outputs "
                "only (PyTorch reads the class dimension of (N, ..., C) outputs as dimension "
                "1); pass class indices, or flatten the positions into the batch."
            )
        if targets.shape != output.shape:
            raise ShapeError(
                f"CrossEntropyLoss targets must be (N,) class indices or (N, {k}) "
                f"probabilities, got {tuple(targets.shape)}."
            )
        return
    if targets.shape != output.shape[:-1]:
        hint = (
            " PyTorch's class dimension 1 is not supported: move the classes last in the "
            "model (e.g. out.movedim(1, -1))."
            if output.dim() > 2 and targets.shape == (n, *output.shape[2:])
            else ""
        )
        raise ShapeError(
            f"CrossEntropyLoss targets must be class indices of shape "
            f"{tuple(output.shape[:-1])} for outputs {tuple(output.shape)} (classes last), "
            f"got {tuple(targets.shape)}.{hint}"
        )
    if output.dim() > 2 and targets.shape[1:] == output.shape[2:]:
        raise ShapeError(
            f"CrossEntropyLoss on outputs {tuple(output.shape)} with targets "
            f"{tuple(targets.shape)} is ambiguous: PyTorch reads dimension 1 as the classes, "
            "curvlab the last one. Make the two sizes differ (e.g. one more output class "
            "than the classes used, or one position fewer)."
        )
    valid = targets[targets != loss_fn.ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= k):
        raise ShapeError(
            f"CrossEntropyLoss targets must lie in [0, {k - 1}] or equal ignore_index="
            f"{loss_fn.ignore_index}."
        )
    if loss_fn.reduction == "mean" and valid.numel() == 0:
        raise ShapeError(
            "every CrossEntropyLoss target equals ignore_index, so the mean loss is "
            "undefined; pass a batch with at least one counted position."
        )


def target_mass(loss_fn: nn.Module, targets: Tensor) -> Tensor | None:
    """Row masses ``m_n = Σ_k y_nk`` ``(N,)`` of CrossEntropyLoss probability targets (the
    factor of each sample's loss Hessian), or ``None`` for every other loss or target.

    Raises:
        ShapeError: a row with negative mass (its loss Hessian is negative definite).
    """
    if not isinstance(loss_fn, nn.CrossEntropyLoss) or not targets.dtype.is_floating_point:
        return None
    mass = targets.sum(dim=-1)
    if (mass < 0).any():
        rows = (mass < 0).nonzero().flatten()[:5].tolist()
        raise ShapeError(
            f"CrossEntropyLoss probability targets have rows with a negative sum (rows "
            f"{rows}); their loss is concave and has no Fisher. Use non-negative targets."
        )
    return mass


def loss_value(loss_fn: nn.Module, output: Tensor, targets: Tensor) -> Tensor:
    """The loss of the module docstring: ``loss_fn(output.flatten(0, -2),
    targets.flatten())`` for cross-entropy on outputs with positions, else
    ``loss_fn(output, targets)``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and output.dim() > 2:
        return loss_fn(output.flatten(0, -2), targets.flatten())
    return loss_fn(output, targets)


def position_mask(loss_fn: nn.Module, output: Tensor, targets: Tensor) -> Tensor | None:
    """``(N, T)`` boolean mask of the positions that count (CE ``ignore_index``), or
    ``None`` when all do."""
    if not isinstance(loss_fn, nn.CrossEntropyLoss) or targets.dtype.is_floating_point:
        return None
    mask = (targets != loss_fn.ignore_index).reshape(output.shape[0], -1)
    return None if bool(mask.all()) else mask


def loss_scales(loss_fn: nn.Module, output: Tensor, targets: Tensor) -> tuple[float, float]:
    """``(s, c)`` of the module docstring for outputs ``(N, *P, K)``."""
    if loss_fn.reduction == "sum":
        return 1.0, 1.0
    n = output.shape[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        mask = position_mask(loss_fn, output, targets)
        m = output[..., 0].numel() if mask is None else int(mask.sum())
        return 1.0 / m, 1.0
    return 1.0 / n, n / output.numel()


def num_fisher_columns(output: Tensor, fisher: str, mc_samples: int = 1) -> int:
    """``C'``: Fisher columns per sample for outputs ``(N, *P, K)``."""
    positions = output[0, ..., 0].numel()
    if fisher == "exact":
        return positions * output.shape[-1]
    return mc_samples if fisher == "mc" else positions


def check_column_budget(output: Tensor, fisher: str, mc_samples: int = 1) -> None:
    """Refuse Fisher columns (outputs with positions) whose Gram (float64, with its
    factor and one assembly buffer, as :class:`~curvlab.ExactFisher`) or column tensor
    exceeds the budget."""
    cols = output.shape[0] * num_fisher_columns(output, fisher, mc_samples)
    need = max(cols * cols * 3 * 8, cols * output[0].numel() * output.element_size())
    if need > options.memory_budget:
        raise MemoryBudgetError(
            f"fisher={fisher!r} on outputs {tuple(output.shape)} gives N·C' = {cols} Fisher "
            f"columns, whose Gram needs about {format_bytes(need)}, over the memory budget of "
            f"{format_bytes(options.memory_budget)}. Use fisher='mc' (one column per "
            "sequence and sample), fewer positions, a smaller batch, or raise "
            "curvlab.config.options.memory_budget."
        )


def fisher_columns(
    loss_fn: nn.Module,
    output: Tensor,
    targets: Tensor,
    grad_output: Tensor,
    fisher: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The columns ``g_nc`` of shape ``(C', *output.shape)`` (module docstring).

    Args:
        loss_fn: A supported loss (checked by :func:`check_loss`).
        output: Detached model output ``(N, *P, K)``.
        targets: The targets (checked by :func:`check_targets`); CrossEntropyLoss
            probability targets scale the ``exact`` and ``mc`` columns by ``√m_n``
            (:func:`target_mass`).
        grad_output: ``∂L/∂f`` at the data labels, output-shaped (gives ``empirical``).
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"``.
        mc_samples: Number of sampled labels per input for ``mc``.
        generator: Random generator for ``mc`` (its device is used for sampling).
    """
    s, c = loss_scales(loss_fn, output, targets)
    n, k = output.shape[0], output.shape[-1]
    f = output.reshape(n, -1, k)  # (N, T, K)
    if fisher == "empirical":
        base = (grad_output.reshape(f.shape) / (s * math.sqrt(c))).unsqueeze(0)
        return _spread(base).reshape(-1, *output.shape)
    mask = position_mask(loss_fn, output, targets)
    if fisher == "exact":
        cols = _spread(_hessian_sqrt_columns(loss_fn, f, c))
    else:
        cols = _mc_columns(loss_fn, f, c, mc_samples, generator)
    if mask is not None:
        cols = cols * mask.unsqueeze(-1).to(cols.dtype)
    mass = target_mass(loss_fn, targets)  # probability targets: (N, C) outputs only
    if mass is not None:
        cols = cols * mass.sqrt().to(cols.dtype).view(1, -1, 1, 1)
    return cols.reshape(-1, *output.shape)


def _spread(base: Tensor) -> Tensor:
    """Per-position columns ``(J, N, T, K)`` -> ``(T·J, N, T, K)``: column ``(t, j)`` is
    ``base[j]`` at position ``t`` and zero elsewhere (``base`` itself when ``T = 1``)."""
    t = base.shape[2]
    if t == 1:
        return base
    eye = torch.eye(t, dtype=base.dtype, device=base.device)
    return torch.einsum("jntk,ts->sjntk", base, eye).reshape(-1, *base.shape[1:])


def _hessian_sqrt_columns(loss_fn: nn.Module, f: Tensor, c: float) -> Tensor:
    """``(K, N, T, K)``: column ``j`` of a square root of ``c ∇²ℓ_nt`` at every position."""
    n, t, k = f.shape
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=-1)
        # column j at (n, t): sqrt(p_ntj) (onehot_j - p_nt)
        cols = p.sqrt().permute(2, 0, 1).unsqueeze(-1) * (eye.view(k, 1, 1, k) - p.unsqueeze(0))
        return cols * math.sqrt(c)
    if isinstance(loss_fn, nn.MSELoss):
        return (math.sqrt(2 * c) * eye).view(k, 1, 1, k).expand(k, n, t, k).clone()
    sig = f.sigmoid()
    diag = (c * sig * (1 - sig)).sqrt()  # (N, T, K)
    return diag.permute(2, 0, 1).unsqueeze(-1) * eye.view(k, 1, 1, k)


def _mc_columns(
    loss_fn: nn.Module, f: Tensor, c: float, samples: int, generator: torch.Generator | None
) -> Tensor:
    """``(S, N, T, K)``: sampled-label gradients at every position."""
    n, t, k = f.shape
    dev = generator.device if generator is not None else f.device
    weight = math.sqrt(c / samples)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=-1)
        flat = p.reshape(-1, k).to(dev, torch.float64)
        labels = torch.multinomial(flat, samples, True, generator=generator)  # (N·T, S)
        onehot = nn.functional.one_hot(labels.T.to(f.device), k).to(f.dtype)
        return weight * (p.unsqueeze(0) - onehot.view(samples, n, t, k))
    if isinstance(loss_fn, nn.MSELoss):
        eps = torch.randn((samples, n, t, k), generator=generator, device=dev, dtype=torch.float64)
        # ŷ = f + ε with ε ~ N(0, 1/2);  ∇_f Σ (f - ŷ)² = -2ε
        return weight * (-2.0 * math.sqrt(0.5) * eps).to(f.device, f.dtype)
    sig = f.sigmoid()
    u = torch.rand((samples, n, t, k), generator=generator, device=dev, dtype=torch.float64)
    y_hat = (u.to(f.device) < sig.unsqueeze(0)).to(f.dtype)
    return weight * (sig.unsqueeze(0) - y_hat)

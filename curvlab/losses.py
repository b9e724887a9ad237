"""Loss functions: scale conventions and the Fisher columns backpropagated by capture.

For a supported loss ``L`` on outputs ``f`` of shape ``(N, C)`` write
``L = s · Σ_n ℓ̃_n`` with ``s = 1/N`` for ``reduction="mean"`` and ``1`` for
``"sum"``, and ``ℓ̃_n = c · ℓ_n`` where ``ℓ_n`` is the per-sample loss summed over
outputs and ``c = 1/C`` for MSE/BCE with mean reduction (PyTorch averages over all
entries), else 1.  This is curvlinops' convention.  The curvature is then

    F = s · Σ_n Σ_c J_nᵀ g_nc g_ncᵀ J_n,

with the *columns* ``g_nc`` (shape ``(C', N, C)``):

* ``exact``: columns of a square root of ``∇²_f ℓ̃_n`` (type-2 Fisher = GGN);
* ``mc``: ``√c ∇_f ℓ_n(f, ŷ) / √S`` for ``S`` labels ``ŷ`` drawn from the model's
  predictive distribution (categorical, Bernoulli, Gaussian with variance 1/2);
* ``empirical``: ``√c ∇_f ℓ_n = ∇_f ℓ̃_n / √c`` at the data labels (so that the
  empirical Fisher matches the GGN's scale, as curvlinops' ``EFLinearOperator``).

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

from curvlab.errors import ShapeError, UnsupportedModelError

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
        "ignore_index": getattr(loss_fn, "ignore_index", -100) != -100,
    }
    used = [k for k, v in extras.items() if v]
    if used:
        raise UnsupportedModelError(
            f"{type(loss_fn).__name__} with {', '.join(used)} is not supported; "
            "use the loss without these options."
        )


def check_targets(loss_fn: nn.Module, output: Tensor, targets: Tensor) -> None:
    """Shape checks between the model output ``(N, C)`` and the targets."""
    if output.dim() != 2:
        raise ShapeError(
            f"the model output must have shape (N, C), got {tuple(output.shape)}; "
            "flatten or pool extra dimensions inside the model."
        )
    n, c = output.shape
    if targets.shape[0] != n:
        raise ShapeError(f"inputs give {n} outputs but targets have batch size {targets.shape[0]}.")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.dim() == 1:
            if targets.dtype.is_floating_point:
                raise ShapeError("CrossEntropyLoss class-index targets must be integers.")
            if targets.numel() and (targets.min() < 0 or targets.max() >= c):
                raise ShapeError(f"CrossEntropyLoss targets must lie in [0, {c - 1}].")
        elif targets.shape != output.shape:
            raise ShapeError(
                f"CrossEntropyLoss targets must be (N,) class indices or (N, {c}) "
                f"probabilities, got {tuple(targets.shape)}."
            )
    elif targets.shape != output.shape:
        raise ShapeError(
            f"{type(loss_fn).__name__} targets must have the output's shape "
            f"{tuple(output.shape)}, got {tuple(targets.shape)}."
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


def loss_scales(loss_fn: nn.Module, output: Tensor) -> tuple[float, float]:
    """``(s, c)`` of the module docstring for outputs of shape ``(N, C)``."""
    n, c_out = output.shape
    mean = loss_fn.reduction == "mean"
    s = 1.0 / n if mean else 1.0
    c = 1.0 / c_out if mean and not isinstance(loss_fn, nn.CrossEntropyLoss) else 1.0
    return s, c


def fisher_columns(
    loss_fn: nn.Module,
    output: Tensor,
    grad_output: Tensor,
    fisher: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """The columns ``g_nc`` of shape ``(C', N, C)`` (module docstring).

    Args:
        loss_fn: A supported loss (checked by :func:`check_loss`).
        output: Detached model output ``(N, C)``.
        grad_output: ``∂L/∂f`` at the data labels, ``(N, C)`` (gives ``empirical``).
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"``.
        mc_samples: Number of sampled labels per input for ``mc``.
        generator: Random generator for ``mc`` (its device is used for sampling).
        targets: The data targets; CrossEntropyLoss probability targets scale the
            ``exact`` and ``mc`` columns by ``√m_n`` (:func:`target_mass`).
    """
    s, c = loss_scales(loss_fn, output)
    if fisher == "empirical":
        return (grad_output / (s * math.sqrt(c))).unsqueeze(0)
    if fisher == "exact":
        cols = _hessian_sqrt_columns(loss_fn, output, c)
    else:
        cols = _mc_columns(loss_fn, output, c, mc_samples, generator)
    mass = None if targets is None else target_mass(loss_fn, targets)
    if mass is not None:
        cols = cols * mass.sqrt().to(cols.dtype).view(1, -1, 1)
    return cols


def _hessian_sqrt_columns(loss_fn: nn.Module, f: Tensor, c: float) -> Tensor:
    n, k = f.shape
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=1)
        # column j of sample n: sqrt(p_nj) (onehot_j - p_n)
        cols = p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
        return cols * math.sqrt(c)
    if isinstance(loss_fn, nn.MSELoss):
        return (math.sqrt(2 * c) * eye).unsqueeze(1).expand(k, n, k).clone()
    sig = f.sigmoid()
    diag = (c * sig * (1 - sig)).sqrt()  # (N, C)
    return diag.T.unsqueeze(-1) * eye.unsqueeze(1)


def _mc_columns(
    loss_fn: nn.Module, f: Tensor, c: float, samples: int, generator: torch.Generator | None
) -> Tensor:
    n, k = f.shape
    dev = generator.device if generator is not None else f.device
    weight = math.sqrt(c / samples)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=1)
        labels = torch.multinomial(p.to(dev, torch.float64), samples, True, generator=generator)
        onehot = nn.functional.one_hot(labels.T.to(f.device), k).to(f.dtype)  # (S, N, C)
        return weight * (p.unsqueeze(0) - onehot)
    if isinstance(loss_fn, nn.MSELoss):
        eps = torch.randn((samples, n, k), generator=generator, device=dev, dtype=torch.float64)
        # ŷ = f + ε with ε ~ N(0, 1/2);  ∇_f Σ (f - ŷ)² = -2ε
        return weight * (-2.0 * math.sqrt(0.5) * eps).to(f.device, f.dtype)
    sig = f.sigmoid()
    u = torch.rand((samples, n, k), generator=generator, device=dev, dtype=torch.float64)
    y_hat = (u.to(f.device) < sig.unsqueeze(0)).to(f.dtype)
    return weight * (sig.unsqueeze(0) - y_hat)

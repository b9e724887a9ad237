"""Dense float64 references for models with outputs ``(N, ..., K)``, built from the
Jacobian of the whole batch's output and the Hessian of the loss as the user writes it
(``loss_fn(f.flatten(0, -2), y.flatten())`` for cross-entropy), without curvlab's code."""

from __future__ import annotations

import reference as R
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


def user_loss(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn(f.flatten(0, -2), y.flatten())
    return loss_fn(f, y)


def token_losses(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """``ℓ_nt`` (summed over the position's outputs), ``(N·T,)``; 0 where ignored."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return F.cross_entropy(
            f.flatten(0, -2), y.flatten(), reduction="none", ignore_index=loss_fn.ignore_index
        )
    if isinstance(loss_fn, nn.MSELoss):
        return ((f - y) ** 2).flatten(0, -2).sum(-1)
    return F.binary_cross_entropy_with_logits(f, y, reduction="none").flatten(0, -2).sum(-1)


def _batch_fn(model: nn.Module, X: Tensor):
    names = list(R.trainable_params(model))

    def fn(theta: Tensor) -> Tensor:
        parts, start = {}, 0
        for name, p in R.trainable_params(model).items():
            parts[name] = theta[start : start + p.numel()].view_as(p)
            start += p.numel()
        assert list(parts) == names
        return functional_call(model, parts, (X,))

    return fn


def dense_ggn(model, loss_fn, X, y) -> Tensor:
    theta = R.flatten(R.trainable_params(model).values()).detach()
    fn = _batch_fn(model, X)
    f = fn(theta).detach()
    J = jacrev(fn)(theta).reshape(f.numel(), -1)
    Hf = hessian(lambda out: user_loss(loss_fn, out, y))(f).reshape(f.numel(), f.numel())
    return J.T @ Hf @ J


def dense_empirical(model, loss_fn, X, y) -> Tensor:
    theta = R.flatten(R.trainable_params(model).values()).detach()
    fn = _batch_fn(model, X)
    G = jacrev(lambda th: token_losses(loss_fn, fn(th), y))(theta)  # (N·T, P)
    f = fn(theta).detach()
    if loss_fn.reduction == "sum":
        sc = 1.0
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        sc = 1.0 / int((y != loss_fn.ignore_index).sum())
    else:
        sc = 1.0 / f.numel()
    return sc * G.T @ G


def dense_from_columns(model, X, columns: Tensor, scale: float) -> Tensor:
    theta = R.flatten(R.trainable_params(model).values()).detach()
    fn = _batch_fn(model, X)
    J = jacrev(fn)(theta)  # (N, T, K, P)
    U = torch.einsum("cntk,ntkp->cnp", columns, J).reshape(-1, theta.numel())
    return scale * U.T @ U


class ClassesFirst(nn.Module):
    """Moves the classes of ``(N, ..., K)`` outputs to dimension 1, the layout in which
    curvlinops' operators call a cross-entropy loss (``nn.Sequential(model, ClassesFirst())``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1)


def curvlinops_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """curvlinops' dense ``GGNLinearOperator`` of ``model`` (classes moved first, under the
    math attention kernel that its forward-mode AD needs), in ``model.parameters()`` order."""
    import curvlinops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = list(R.trainable_params(model).values())
    peer = nn.Sequential(model, ClassesFirst())
    with sdpa_kernel(SDPBackend.MATH):
        op = curvlinops.GGNLinearOperator(peer, loss_fn, params, [(X, y)])
        return op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)

"""Quantities BackPACK already computes, wrapped rather than re-derived.

BackPACK runs its own forward and backward (on a deep copy of the model and loss, so
the user's modules keep no BackPACK hooks).  Supported by BackPACK: ``nn.Sequential``-
like models of Linear/Conv layers with ReLU/Sigmoid/Tanh/Flatten/pooling in between.

* :func:`backpack_kron_factors` — KFLR (exact type-2), KFRA or KFAC (MC) factors.
* :class:`BackpackKFAC` — those factors as a curvlab curvature object.  BackPACK keeps
  weight and bias apart (no cross term): the ``[W | b]`` input factor is
  ``blockdiag(A, 1)``.  For conv layers BackPACK's factors differ from KFC "expand"
  and "reduce" (METHODS.md), which is why they are offered as a third variant.
* :func:`backpack_diag_ggn` — the exact GGN diagonal (DiagGGNExact) or its MC estimate.
* :func:`backpack_batch_grad` — individual gradients ``(N, P)`` (BatchGrad).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.factors import LayerFactors
from curvlab.curvature.kfac import KFACBlock
from curvlab.errors import OptionError
from curvlab.layers import find_layers
from curvlab.numerics import SOLVE_DTYPE, compute_dtype

KRON_KINDS = ("kflr", "kfra", "kfac")


def _run(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, *extensions):
    """Run BackPACK on copies; return ``{layer name: copied module}`` after backward."""
    from backpack import backpack, extend

    model_c = extend(copy.deepcopy(model))
    loss_c = extend(copy.deepcopy(loss_fn))
    model_c.zero_grad()
    loss = loss_c(model_c(inputs), targets)
    with backpack(*extensions):
        loss.backward()
    names = [info.name for info in find_layers(model)]
    modules = dict(model_c.named_modules())
    return {name: modules[name] for name in names}


def backpack_kron_factors(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, kind: str = "kflr"
) -> dict[str, dict[str, Tensor]]:
    """BackPACK's Kronecker factors per layer: ``{"G": G, "A": A}`` (float64).

    ``A`` is the weight's input factor (``d_in x d_in``), ``G`` the output factor
    shared by weight and bias.  ``kind``: ``"kflr"``, ``"kfra"`` or ``"kfac"`` (MC).
    """
    from backpack import extensions

    if kind not in KRON_KINDS:
        raise OptionError(f"kind={kind!r} is unknown; choose one of {', '.join(KRON_KINDS)}.")
    ext = {"kflr": extensions.KFLR, "kfra": extensions.KFRA, "kfac": extensions.KFAC}[kind]()
    out = {}
    for name, module in _run(model, loss_fn, inputs, targets, ext).items():
        g, a = getattr(module.weight, kind)
        out[name] = {"G": g.to(SOLVE_DTYPE), "A": a.to(SOLVE_DTYPE)}
    return out


class BackpackKFAC(LayerwiseCurvature):
    """BackPACK's Kronecker factors (KFLR/KFRA/KFAC) behind curvlab's interface.

    Args:
        capture: A capture of the same model and batch (gives the layer layout).
        model, loss_fn, inputs, targets: What BackPACK runs on (copied, not modified).
        kind: ``"kflr"`` (default), ``"kfra"`` or ``"kfac"``.
        damping_mode: As for :class:`curvlab.KFAC`.
    """

    def __init__(
        self,
        capture: Capture,
        model: nn.Module,
        loss_fn: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        kind: str = "kflr",
        damping_mode: str = "heuristic",
    ):
        factors = backpack_kron_factors(model, loss_fn, inputs, targets, kind)
        dtype = compute_dtype(capture.dtype)
        blocks = {}
        for lc in capture.layers:
            a, g = factors[lc.name]["A"], factors[lc.name]["G"]
            if lc.info.has_bias:
                a = torch.block_diag(a, torch.ones(1, 1, dtype=a.dtype, device=a.device))
            blocks[lc.name] = KFACBlock(LayerFactors(lc.info, a, g), damping_mode, dtype)
        super().__init__(blocks)


def backpack_diag_ggn(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, exact: bool = True
) -> Tensor:
    """Diagonal of the GGN as a flat vector (DiagGGNExact, or DiagGGNMC if not ``exact``)."""
    from backpack import extensions

    ext = extensions.DiagGGNExact() if exact else extensions.DiagGGNMC()
    attr = "diag_ggn_exact" if exact else "diag_ggn_mc"
    modules = _run(model, loss_fn, inputs, targets, ext)
    return torch.cat([getattr(p, attr).reshape(-1) for p in _params(model, modules)])


def backpack_batch_grad(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> Tensor:
    """Individual gradients ``(N, P)`` of the reduced loss (BackPACK's BatchGrad scale)."""
    from backpack import extensions

    modules = _run(model, loss_fn, inputs, targets, extensions.BatchGrad())
    params = _params(model, modules)
    return torch.cat([p.grad_batch.reshape(p.grad_batch.shape[0], -1) for p in params], dim=1)


def _params(model: nn.Module, modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    """The copies' parameters in curvlab's flat layout."""
    out = []
    for info in find_layers(model):
        copy_module = modules[info.name]
        out.append(copy_module.weight)
        if info.has_bias:
            out.append(copy_module.bias)
    return out

"""The step every curvlab optimizer shares: capture, precondition, clip, update in place.

A :class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` over the parameters that
:func:`curvlab.capture` sees (the supported layers' trainable parameters, DESIGN.md
flat layout), in one parameter group.  Because the curvature needs the model, the
loss and a batch, the step takes the batch instead of a closure::

    opt = curvlab.optim.KFAC(model, loss_fn, lr=0.1, damping=1e-3)
    loss = opt.step(inputs, targets)                       # loss before the update
    loss = opt.step(inputs, targets, curvature_batch=(x2, y2))   # curvature on (x2, y2)

One step, for the mini-batch gradient ``g`` (flat, ``(P,)``):

1. when the method wants fresh curvature this step, one :func:`curvlab.capture` on the
   batch (which also yields ``g``), or on ``curvature_batch`` when given (then ``g``
   comes from a plain forward/backward on ``(inputs, targets)``; Benzing 2022,
   App. I.5: independent batches make ``F̂⁻¹ ĝ`` less biased);
2. ``d = P(g)``, the method's preconditioned direction (flat);
3. KL clipping (Martens & Grosse 2015; Ba et al. 2016), when ``kl_clip = κ`` is set:
   ``d ← ν d`` with ``ν = min(1, sqrt(κ / (lr² Σ_l |d_lᵀ g_l|)))``, so that the
   step's squared curvature norm, estimated as ``lr² ν² Σ_l |d_lᵀ g_l|`` (``C d ≈ g``),
   is at most ``κ``;
4. weight decay and heavy-ball momentum on the preconditioned direction, as SGD does
   on the gradient: ``d ← d + wd·θ``, ``buf ← μ buf + d`` (``buf = d`` at first),
   ``θ ← θ − lr·buf``, written into ``p.data``.

Hyperparameters are read from ``param_groups[0]`` at every step, so learning-rate
schedulers and manual changes take effect.  Everything that defines the trajectory
(counters, moving averages, momentum buffers, factors in use) lives in ``self.state``
and round-trips through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture, capture
from curvlab.errors import OptionError, ShapeError
from curvlab.layers import LayerKind, find_layers
from curvlab.losses import FISHER_TYPES, check_loss, loss_value
from curvlab.numerics import SOLVE_DTYPE, check_choice, check_damping

GLOBAL = "global"  # key of the optimizer-wide entry of ``self.state``


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: one parameter group over the captured parameters.

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss (``CrossEntropyLoss``, ``MSELoss``,
            ``BCEWithLogitsLoss``, reduction ``"mean"`` or ``"sum"``).
        defaults: Hyperparameters of the group; must hold ``lr``, ``damping``,
            ``momentum``, ``weight_decay`` and ``kl_clip`` (``None`` = off).
        fisher: Fisher type of the captures (``"mc"``, ``"exact"``, ``"empirical"``).
        mc_samples: Sampled labels per input for ``"mc"``.
        generator: Random generator for the ``"mc"`` labels.

    Subclasses implement :meth:`_wants_curvature`, :meth:`_update_curvature` and
    :meth:`_precondition`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        defaults: dict[str, Any],
        fisher: str = "mc",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ):
        check_loss(loss_fn)
        check_choice("fisher", fisher, FISHER_TYPES)
        _check_hyperparameters(defaults)
        self.model, self.loss_fn = model, loss_fn
        self.fisher, self.mc_samples, self.generator = fisher, mc_samples, generator
        self.layers: list[LayerKind] = find_layers(model)
        super().__init__([p for info in self.layers for p in info.params], defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the one group built at construction is supported (the curvature couples
        all captured parameters)."""
        if self.param_groups:
            raise OptionError(
                f"{type(self).__name__} manages exactly the captured parameters in one group; "
                "build a second optimizer for other parameters."
            )
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``; the optimizer-wide entry is copied, not shared with
        ``state_dict`` (its values are replaced, never modified, by later steps)."""
        super().load_state_dict(state_dict)
        self.state[GLOBAL] = dict(self.state[GLOBAL])

    @property
    def steps(self) -> int:
        """Number of completed steps."""
        return self.state[GLOBAL].get("steps", 0)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.layers[0].params[0].dtype

    def step(
        self,
        inputs: Tensor,
        targets: Tensor,
        curvature_batch: tuple[Tensor, Tensor] | None = None,
    ) -> float:
        """One update of the model's parameters in place (module docstring).

        Args:
            inputs: Mini-batch inputs on the model's device.
            targets: Their targets.
            curvature_batch: Optional independent ``(inputs, targets)`` to estimate the
                curvature on; the gradient still comes from ``(inputs, targets)``.

        Returns:
            The mini-batch loss before the update.
        """
        group = self.param_groups[0]
        _check_hyperparameters(group)
        k = self.steps
        if not self._wants_curvature(k):
            loss, grad = self._gradient(inputs, targets)
        elif curvature_batch is None:
            capt = self._capture(inputs, targets)
            loss, grad = capt.loss, capt.grad
            self._update_curvature(capt, k)
        else:
            if len(curvature_batch) != 2:
                raise ShapeError("curvature_batch must be a pair (inputs, targets).")
            loss, grad = self._gradient(inputs, targets)
            self._update_curvature(self._capture(*curvature_batch), k)
        direction = self._precondition(grad, group)
        direction = direction * self._kl_scale(direction, grad, group)
        self._apply(direction, group)
        self.state[GLOBAL]["steps"] = k + 1
        return loss

    # ------------------------------------------------------------------------------
    # what subclasses provide
    # ------------------------------------------------------------------------------

    @abstractmethod
    def _wants_curvature(self, k: int) -> bool:
        """Whether step ``k`` (0-based) captures curvature."""

    @abstractmethod
    def _update_curvature(self, capt: Capture, k: int) -> None:
        """Fold the capture of step ``k`` into the method's curvature state."""

    @abstractmethod
    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """The preconditioned direction ``(P,)`` for the flat gradient ``grad``."""

    # ------------------------------------------------------------------------------
    # shared machinery
    # ------------------------------------------------------------------------------

    def _capture(self, inputs: Tensor, targets: Tensor) -> Capture:
        capt = capture(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            generator=self.generator,
        )
        # the capture knows which modules the forward pass calls repeatedly (read as
        # shared layers, same parameters and layout)
        self.layers = [lc.info for lc in capt.layers]
        return capt

    def _gradient(self, inputs: Tensor, targets: Tensor) -> tuple[float, Tensor]:
        """Loss and flat gradient from a plain forward/backward (no hooks)."""
        params = self.param_groups[0]["params"]
        with torch.enable_grad():
            loss = loss_value(self.loss_fn, self.model(inputs), targets)
            grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])

    def _kl_scale(self, direction: Tensor, grad: Tensor, group: dict[str, Any]) -> float:
        """``ν`` of the KL clipping (1 when off); also stored as ``state["global"]["kl_scale"]``."""
        kappa, lr = group["kl_clip"], group["lr"]
        nu = 1.0
        if kappa is not None:
            prod = direction.to(SOLVE_DTYPE) * grad.to(direction.device, SOLVE_DTYPE)
            quad = sum(prod[info.slice].sum().abs() for info in self.layers)
            total = lr**2 * float(quad)
            if total > kappa:
                nu = math.sqrt(kappa / total)
        self.state[GLOBAL]["kl_scale"] = nu
        return nu

    @torch.no_grad()
    def _apply(self, direction: Tensor, group: dict[str, Any]) -> None:
        """Weight decay, momentum and ``θ ← θ − lr·buf`` on ``p.data``."""
        params = group["params"]
        pieces = direction.split([p.numel() for p in params])
        for p, d in zip(params, pieces):
            d = d.view_as(p).to(p.dtype)
            if group["weight_decay"]:
                d = d + group["weight_decay"] * p.data
            if group["momentum"]:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                self.state[p]["momentum_buffer"] = buf
                d = buf
            p.data.add_(d, alpha=-group["lr"])


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Validate the shared hyperparameters of a group."""
    if not group["lr"] >= 0:
        raise OptionError(f"lr must be ≥ 0, got {group['lr']!r}.")
    if not 0 <= group["momentum"] < 1:
        raise OptionError(f"momentum must lie in [0, 1), got {group['momentum']!r}.")
    if not group["weight_decay"] >= 0:
        raise OptionError(f"weight_decay must be ≥ 0, got {group['weight_decay']!r}.")
    if group["kl_clip"] is not None and not group["kl_clip"] > 0:
        raise OptionError(f"kl_clip must be > 0 or None, got {group['kl_clip']!r}.")
    check_damping(group["damping"], allow_zero=False)

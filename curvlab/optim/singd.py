"""SINGD (Lin et al. 2024): inverse-free, structured Kronecker preconditioning.

Per layer, two structured factors ``K (d_in_h x d_in_h)`` and ``C (d_out x d_out)``
(:mod:`curvlab.optim.structures`, identity at the start) are updated from the KFAC
statistics of the capture, ``U_K = A = Σ ā āᵀ/(N T)`` and ``U_C = G = s Σ e eᵀ``
(:mod:`curvlab.curvature.factors`; empirical Fisher by default), with products only —
no inverse or decomposition, so the whole update runs in the factors' dtype
(bfloat16 included).  With ``H_K = Kᵀ U_K K``, ``H_C = Cᵀ U_C C`` and the structure's
projection ``Π̂``:

* IKFAC (inverse-free KFAC): ``m_K = ½ [Π̂(H_K + λ KᵀK) − I]``, ``K ← K (I − β₁ m_K)``
  (same for ``C``).  ``K Kᵀ`` tracks ``(S_K + λI)⁻¹`` for the moving average
  ``S_K ← (1 − β₁) S_K + β₁ U_K`` up to ``O(β₁²)`` per update (SINGD, Thm. 1).
* INGD: with ``c² = λ tr(CᵀC)``, ``κ² = λ tr(KᵀK)`` and Riemannian momentum ``α₁``,
  ``m_K ← α₁ m_K + β₁/(2 d_out) [Π̂(tr(H_C) H_K + c² KᵀK) − d_out I]``,
  ``m_C ← α₁ m_C + β₁/(2 d_in) [Π̂(tr(H_K) H_C + κ² CᵀC) − d_in I]``, then
  ``K ← K (I − m_K)``, ``C ← C (I − m_C)``.  Its fixed point (``m = 0``) is
  ``(K Kᵀ)⁻¹ = [tr(U_C C Cᵀ) U_K + λ tr(C Cᵀ) I] / d_out`` and likewise for ``C Cᵀ``.

The direction of a layer is ``Δ = C Cᵀ ∇W̄ K Kᵀ`` (``∇W̄`` the ``d_out x d_in_h``
gradient matrix); momentum and weight decay follow :mod:`curvlab.optim.base`.
Factors are updated every ``update_every`` steps, before the direction is taken.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.capture import Capture
from curvlab.curvature.factors import grad_factor, input_factor
from curvlab.errors import OptionError
from curvlab.layers import LayerKind
from curvlab.numerics import check_choice
from curvlab.optim.base import GLOBAL, CurvatureOptimizer
from curvlab.optim.structures import Structure, StructuredMatrix, as_structure

UPDATE_RULES = ("ikfac", "ingd")


def sandwich(k: StructuredMatrix, u: Tensor, shift: float = 0.0) -> Tensor:
    """``Kᵀ (U + shift·I) K`` as a dense ``(d, d)`` matrix, for dense symmetric ``U (d, d)``."""
    uk = k.rmm(u)
    if shift:
        uk = uk + shift * k.to_dense()
    return k.tmm(uk)


def ikfac_step(k: StructuredMatrix, u: Tensor, damping: float, beta1: float) -> StructuredMatrix:
    """One IKFAC update ``K ← K (I − β₁ m_K)``, ``m_K = ½[Π̂(Kᵀ(U + λI)K) − I]``."""
    eye = k.structure.identity(k.dim, k.dtype, k.device)
    m = (k.structure.project(sandwich(k, u, damping)) - eye) * 0.5
    return k @ (eye - m * beta1)


def ingd_step(
    k: StructuredMatrix,
    c: StructuredMatrix,
    m_k: StructuredMatrix,
    m_c: StructuredMatrix,
    u_k: Tensor,
    u_c: Tensor,
    damping: float,
    beta1: float,
    alpha1: float,
) -> tuple[StructuredMatrix, StructuredMatrix, StructuredMatrix, StructuredMatrix]:
    """One INGD update of ``(K, C, m_K, m_C)`` (module docstring)."""
    d_in, d_out = k.dim, c.dim
    h_k, h_c = sandwich(k, u_k), sandwich(c, u_c)
    ktk, ctc = k.tmm(k.to_dense()), c.tmm(c.to_dense())
    c2, kappa2 = damping * c.squared_norm(), damping * k.squared_norm()
    eye_k = k.structure.identity(d_in, k.dtype, k.device)
    eye_c = c.structure.identity(d_out, c.dtype, c.device)
    step_k = k.structure.project(h_c.diagonal().sum() * h_k + c2 * ktk) - eye_k * d_out
    step_c = c.structure.project(h_k.diagonal().sum() * h_c + kappa2 * ctc) - eye_c * d_in
    m_k = m_k * alpha1 + step_k * (beta1 / (2 * d_out))
    m_c = m_c * alpha1 + step_c * (beta1 / (2 * d_in))
    return k @ (eye_k - m_k), c @ (eye_c - m_c), m_k, m_c


def precondition_matrix(k: StructuredMatrix, c: StructuredMatrix, grad: Tensor) -> Tensor:
    """``C Cᵀ ∇W̄ K Kᵀ`` for the gradient matrix ``∇W̄ (d_out, d_in_h)``."""
    x = k.rmm(c.mm(c.tmm(grad)))  # C Cᵀ ∇ K
    return k.mm(x.T).T


class SINGD(CurvatureOptimizer):
    """Structured inverse-free natural gradient (IKFAC or INGD update rule).

    Args:
        model: Network accepted by :func:`curvlab.capture`.
        loss_fn: A supported loss.
        lr: Learning rate ``β₂``.
        damping: ``λ``.
        update_rule: ``"ikfac"`` (default) or ``"ingd"``.
        structure: Structure of ``K`` and ``C`` (a :class:`~curvlab.optim.structures.
            Structure` or a name: ``"dense"``, ``"diagonal"``, ``"block_diagonal"``
            (blocks of 16), ``"hierarchical"`` (``k1 = k2 = 15``)), or a pair
            ``(structure of K, structure of C)``.
        preconditioner_lr: ``β₁``, step size of the factor updates.
        riemannian_momentum: ``α₁`` (INGD only).
        update_every: Steps between factor updates (``T``).
        momentum: Heavy-ball momentum ``α₂`` on the preconditioned direction.
        weight_decay: ``γ``: ``γ·θ`` added to the preconditioned direction.
        kl_clip: ``κ`` of the KL clipping (:mod:`curvlab.optim.base`), or ``None``.
        fisher: Fisher type for ``U_C`` (``"empirical"`` as in SINGD, ``"mc"``, ``"exact"``).
        mc_samples: Sampled labels per input for ``"mc"``.
        generator: Random generator for the ``"mc"`` labels.
        dtype: Dtype of the factors and of their updates (default: the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.05,
        damping: float = 1e-3,
        update_rule: str = "ikfac",
        structure: str | Structure | tuple[str | Structure, str | Structure] = "dense",
        preconditioner_lr: float = 0.05,
        riemannian_momentum: float = 0.5,
        update_every: int = 1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        fisher: str = "empirical",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_choice("update_rule", update_rule, UPDATE_RULES)
        if int(update_every) != update_every or update_every < 1:
            raise OptionError(f"update_every must be an integer ≥ 1, got {update_every!r}.")
        if not preconditioner_lr > 0 or not 0 <= riemannian_momentum < 1:
            raise OptionError(
                "preconditioner_lr must be > 0 and riemannian_momentum in [0, 1), got "
                f"{preconditioner_lr!r} and {riemannian_momentum!r}."
            )
        pair = structure if isinstance(structure, tuple) else (structure, structure)
        self.structures = (as_structure(pair[0]), as_structure(pair[1]))
        self.update_rule, self.update_every = update_rule, int(update_every)
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
            preconditioner_lr=preconditioner_lr,
            riemannian_momentum=riemannian_momentum,
        )
        super().__init__(model, loss_fn, defaults, fisher, mc_samples, generator)
        self.factor_dtype = self.dtype if dtype is None else dtype

    @property
    def factors(self) -> dict[str, dict[str, StructuredMatrix]]:
        """Layer name -> ``{"K": K, "C": C}`` (plus ``"m_K"``, ``"m_C"`` for INGD)."""
        state = self.state[GLOBAL]
        if "factors" not in state:
            state["factors"] = {info.name: self._initial_factors(info) for info in self.layers}
        return state["factors"]

    def _initial_factors(self, info: LayerKind) -> dict[str, StructuredMatrix]:
        """``K = I``, ``C = I`` (and zero INGD momenta) in the factor dtype."""
        dev, dt = info.params[0].device, self.factor_dtype
        s_k, s_c = self.structures
        f = {"K": s_k.identity(info.d_in_h, dt, dev), "C": s_c.identity(info.d_out, dt, dev)}
        if self.update_rule == "ingd":
            f["m_K"], f["m_C"] = s_k.zeros(info.d_in_h, dt, dev), s_c.zeros(info.d_out, dt, dev)
        return f

    def _wants_curvature(self, k: int) -> bool:
        return k % self.update_every == 0

    def _update_curvature(self, capt: Capture, k: int) -> None:
        group = self.param_groups[0]
        lam, beta1 = group["damping"], group["preconditioner_lr"]
        factors = dict(self.factors)
        for lc in capt.layers:
            f = dict(factors[lc.name])
            u_k = input_factor(lc.a).to(self.factor_dtype)
            u_c = grad_factor(lc.e, capt.scale).to(self.factor_dtype)
            if self.update_rule == "ikfac":
                f["K"] = ikfac_step(f["K"], u_k, lam, beta1)
                f["C"] = ikfac_step(f["C"], u_c, lam, beta1)
            else:
                alpha1 = group["riemannian_momentum"]
                new = ingd_step(f["K"], f["C"], f["m_K"], f["m_C"], u_k, u_c, lam, beta1, alpha1)
                f["K"], f["C"], f["m_K"], f["m_C"] = new
            factors[lc.name] = f
        self.state[GLOBAL]["factors"] = factors

    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        parts = []
        for info in self.layers:
            f = self.factors[info.name]
            g = info.to_matrix(grad[info.slice].to(self.factor_dtype))
            parts.append(info.to_flat(precondition_matrix(f["K"], f["C"], g)).reshape(-1))
        return torch.cat(parts)

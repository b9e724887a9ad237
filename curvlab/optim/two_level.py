"""Two-level KFAC (Tselepidis, Kohler & Orvieto 2020): KFAC plus a coarse correction.

    d = KFAC⁻¹ g + Zᵀ (F_c + λI)⁻¹ Z g,

with ``KFAC⁻¹`` the damped KFAC solve of :class:`curvlab.optim.KFAC` (same moving
averages, amortisation and damping mode), ``Z`` the per-layer sum and ``F_c = Â_c ∘ Ĝ_c``
the coarse KFAC Fisher of :mod:`curvlab.optim.coarse` (cross-layer sums; layers coupled
only when their number of locations ``T`` agrees).  ``A_c`` and ``G_c`` are averaged
like the KFAC factors (same decay, bias correction and schedule; frozen at each
inversion) and ``F_c`` is a new tensor formed from the frozen ones whenever it is used —
nothing is symmetrised or accumulated in place, so repeated inversions with unchanged
statistics give the same coarse matrix.  The ``L x L`` Cholesky is redone per step.  The coarse
system is damped with the same ``λ`` as the blocks, ``F_c + λI`` (paper, App. A), or
consistently with them, ``F_c + λ Z Zᵀ`` (``coarse_damping="consistent"``).
:attr:`TwoLevelKFAC.term_norms` gives the norms of the two terms of each step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.capture import Capture
from curvlab.errors import OptionError, SingularMatrixError
from curvlab.numerics import SOLVE_DTYPE, check_choice, check_finite
from curvlab.optim.base import GLOBAL
from curvlab.optim.coarse import coarse_factors, prolong, restrict
from curvlab.optim.kfac import KFAC
from curvlab.optim.kronecker import StatKey

COARSE_DAMPINGS = ("paper", "consistent")


class TwoLevelKFAC(KFAC):
    """KFAC with the coarse-space correction ``Zᵀ(F_c + λD)⁻¹Z g``.

    Takes the arguments of :class:`curvlab.optim.KFAC`, and

    Args:
        coarse_damping: ``"paper"`` (default): ``D = I``, as the paper damps the coarse
            system (App. A); ``"consistent"``: ``D = Z Zᵀ = diag(n_l)`` (``n_l``: the
            layer's parameter count), so that ``F_c + λD = Z (F̃ + λI) Zᵀ`` is the
            coarse projection of the damped KFAC Fisher.  With ``"paper"`` the coarse
            system is ``n_l`` times less damped than the blocks are.
    """

    def __init__(self, *args: Any, coarse_damping: str = "paper", **kwargs: Any):
        check_choice("coarse_damping", coarse_damping, COARSE_DAMPINGS)
        self.coarse_damping = coarse_damping
        super().__init__(*args, **kwargs)

    @property
    def coarse_matrix(self) -> Tensor:
        """``F_c = Â_c ∘ Ĝ_c`` in use, ``(L, L)`` float64 (a new tensor on every call)."""
        stats = self.statistics
        return stats[None, "A_coarse"] * stats[None, "G_coarse"]

    def coarse_correction(self, grad: Tensor, damping: float) -> Tensor:
        """``Zᵀ (F_c + λD)⁻¹ Z g`` as a flat vector in the blocks' dtype (``D``: see
        ``coarse_damping``)."""
        f_c = self.coarse_matrix
        check_finite(f_c, "the coarse Fisher F_c", "Lower the learning rate.")
        if self.coarse_damping == "paper":
            diag = torch.ones(f_c.shape[0], dtype=SOLVE_DTYPE, device=f_c.device)
        else:
            sizes = [info.num_params for info in self.layers]
            diag = torch.tensor(sizes, dtype=SOLVE_DTYPE, device=f_c.device)
        chol, info = torch.linalg.cholesky_ex(f_c + damping * torch.diag(diag))
        if info.item() != 0:
            raise SingularMatrixError(
                f"F_c + λD is not numerically positive definite at damping={damping}; "
                "increase the damping."
            )
        z_g = restrict(self.layers, grad.to(SOLVE_DTYPE)).unsqueeze(1)
        coarse = torch.cholesky_solve(z_g, chol).squeeze(1)
        return prolong(self.layers, coarse).to(self.block_dtype)

    def _statistics(self, capt: Capture) -> dict[StatKey, Tensor]:
        a_c, g_c = coarse_factors(capt)
        return {**super()._statistics(capt), (None, "A_coarse"): a_c, (None, "G_coarse"): g_c}

    @property
    def term_norms(self) -> tuple[float, float]:
        """``(‖KFAC⁻¹ g‖, ‖Zᵀ(F_c + λD)⁻¹ Z g‖)`` of the last step's gradient ``g``: the
        Euclidean norms of the two terms of its direction, before KL clipping, weight
        decay and momentum (which scale or smooth their sum)."""
        state = self.state[GLOBAL]
        if "coarse_term_norm" not in state:
            raise OptionError("term_norms exist only after a step; call step() first.")
        return state["kfac_term_norm"], state["coarse_term_norm"]

    def _precondition(self, grad: Tensor, group: dict[str, Any]) -> Tensor:
        fine = super()._precondition(grad, group)
        coarse = self.coarse_correction(grad, group["damping"]).to(fine.device)
        state = self.state[GLOBAL]
        state["kfac_term_norm"] = float(fine.to(SOLVE_DTYPE).norm())
        state["coarse_term_norm"] = float(coarse.to(SOLVE_DTYPE).norm())
        return fine + coarse

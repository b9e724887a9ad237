"""One-batch two-level KFAC (Tselepidis, Kohler & Orvieto 2020) as a curvature object.

The matrix is KFAC's ``⊕_l A_l ⊗ G_l`` (:class:`curvlab.KFAC`); the method's own damping
rule adds the coarse-space correction of :mod:`curvlab.optim.two_level` to KFAC's
damped solve, with the coarse KFAC Fisher ``F_c = A_c ∘ G_c`` of this one capture
(:func:`curvlab.optim.coarse.kfac_coarse_fisher`, ``L x L``):

    solve(v, λ) = KFAC_λ⁻¹ v + Zᵀ (F_c + λD)⁻¹ Z v,

``Z`` the per-layer sum, ``D = I`` (``coarse_damping="paper"``) or ``D = Z Zᵀ``
(``"consistent"``).  It is the optimizer's direction with no moving averages.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture
from curvlab.curvature.kfac import KFAC
from curvlab.errors import SingularMatrixError
from curvlab.numerics import SOLVE_DTYPE, check_choice
from curvlab.optim.coarse import kfac_coarse_fisher, prolong, restrict
from curvlab.optim.two_level import COARSE_DAMPINGS


class TwoLevelKFACCurvature(KFAC):
    """KFAC's matrix with the two-level solve (module docstring).

    Args:
        capture: The capture to read.
        damping_mode: KFAC's damping of the blocks, ``"heuristic"`` or ``"standard"``.
        coarse_damping: ``"paper"`` (``F_c + λI``) or ``"consistent"`` (``F_c + λ Z Zᵀ``).
    """

    def __init__(
        self, capture: Capture, damping_mode: str = "heuristic", coarse_damping: str = "paper"
    ):
        check_choice("coarse_damping", coarse_damping, COARSE_DAMPINGS)
        super().__init__(capture, damping_mode)
        self.coarse_damping = coarse_damping
        self.coarse_fisher = kfac_coarse_fisher(capture)
        self._infos = [lc.info for lc in capture.layers]

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        fine = super()._solve(v, damping)
        sizes = torch.tensor(
            [float(info.num_params) for info in self._infos],
            dtype=SOLVE_DTYPE,
            device=self.coarse_fisher.device,
        )
        shift = torch.ones_like(sizes) if self.coarse_damping == "paper" else sizes
        system = self.coarse_fisher + torch.diag(damping * shift)
        chol, info = torch.linalg.cholesky_ex(system)
        if info.item() != 0:
            raise SingularMatrixError(
                f"the coarse system F_c + λD is not positive definite at damping={damping}; "
                "increase the damping."
            )
        z = restrict(self._infos, v.to(SOLVE_DTYPE)).unsqueeze(1)
        coarse = torch.cholesky_solve(z, chol).squeeze(1)
        return fine + prolong(self._infos, coarse).to(fine.dtype)

    def damping_excess(self, damping: float) -> Tensor | None:
        """No closed form for the two-level rule: ``None``."""
        return None

"""Diagonal approximations: the diagonal of the compared Fisher/GGN and of the
empirical Fisher (the statistics behind Adam-like methods).

For a layer with per-column gradients ``Γ_nc = Σ_t e_nct ā_ntᵀ`` the diagonal of its
exact block is ``D = s Σ_nc Γ_nc²`` (elementwise, ``d_out x d_in_h``):

* :class:`DiagFisher` (method ``diag-ggn``): the columns of the capture, so ``D`` is
  the diagonal of the compared ``F`` (of the GGN for ``fisher="exact"``);
* :class:`DiagEmpiricalFisher` (method ``diag-ef``): the empirical Fisher's columns,
  the gradient's own output rows over ``r = s √c`` (:attr:`Capture.empirical_ratio`):
  ``D = s Σ_n (Σ_t g_nt ā_ntᵀ / r)²``, whatever Fisher type was captured.  Adam's
  second-moment estimate without the moving average (Adam preconditions with
  ``sqrt(D)``; here ``solve(v, λ) = v / (D + λ)``, like every curvature).

Both are blocks diagonal in the identity basis (:class:`EigenBlock` with
``Q_out = Q_in = I``).
"""

from __future__ import annotations

from curvlab.capture import Capture, LayerCapture
from curvlab.curvature.base import LayerwiseCurvature
from curvlab.curvature.columns import eigenbasis_second_moment
from curvlab.curvature.eigen_block import EigenBlock
from curvlab.errors import OptionError
from curvlab.numerics import compute_dtype


class DiagFisher(LayerwiseCurvature):
    """The diagonal of the captured Fisher/GGN, ``D = s Σ_nc Γ_nc²`` per layer."""

    def __init__(self, capture: Capture):
        dtype = compute_dtype(capture.dtype)
        super().__init__(
            {
                lc.name: EigenBlock(
                    lc.info,
                    None,
                    None,
                    eigenbasis_second_moment(lc, None, None, capture.scale),
                    dtype,
                )
                for lc in capture.layers
            }
        )


class DiagEmpiricalFisher(LayerwiseCurvature):
    """The diagonal of the empirical Fisher from the gradient's output rows.

    Raises:
        ValueError: the capture holds no gradient rows.
    """

    def __init__(self, capture: Capture):
        if capture.empirical_ratio is None or any(lc.g is None for lc in capture.layers):
            raise OptionError(
                "the diagonal empirical Fisher needs the gradient's output rows; capture "
                "with gradient rows (the default of curvlab.capture) and outputs (N, C) (with "
                "positions the empirical Fisher is per token: use fisher='empirical')"
            )
        dtype = compute_dtype(capture.dtype)
        ratio = capture.empirical_ratio
        blocks = {}
        for lc in capture.layers:
            rows = LayerCapture(lc.info, lc.a, lc.g.unsqueeze(0) / ratio)
            d = eigenbasis_second_moment(rows, None, None, capture.scale)
            blocks[lc.name] = EigenBlock(lc.info, None, None, d, dtype)
        super().__init__(blocks)

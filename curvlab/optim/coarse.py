"""The coarse space of two-level KFAC (Tselepidis et al. 2020): one unknown per layer.

``Z`` (``L x P``) sums each layer's parameters: ``(Z v)_l = 1ᵀ v_l`` over the layer's
``[W | b]`` entries; ``Zᵀ c`` spreads ``c_l`` over layer ``l``'s entries.  Write, per
location, ``σ_nt,l = 1·ā_nt,l`` (input sum, homogeneous 1 included) and
``ρ_cnt,l = 1·e_cnt,l`` (output-gradient sum).

* Exact coarse Fisher: ``Z F Zᵀ = s Σ_{n,c} S_nc S_ncᵀ`` with
  ``S_nc,l = Σ_t ρ_cnt,l σ_nt,l`` (the sum of the per-(sample, column) gradient of
  layer ``l``), from any capture and any ``T``.
* KFAC coarse Fisher: the coarse projection of the Kronecker-factored Fisher with
  cross-layer factors ``A_ij = Σ_{n,t} ā_nt,i ā_nt,jᵀ/(N T)``, ``G_ij = s Σ_{c,n,t}
  e_cnt,i e_cnt,jᵀ``: ``F_c[i,j] = (1ᵀ A_ij 1)(1ᵀ G_ij 1) = A_c[i,j] · G_c[i,j]`` with
  ``A_c[i,j] = Σ_{n,t} σ_i σ_j/(N T)`` and ``G_c[i,j] = s Σ_{c,n,t} ρ_i ρ_j``.  The
  diagonal is ``1ᵀ(A_l ⊗ G_l)1`` of the KFAC blocks.  Cross-layer terms need matching
  locations, so layers are coupled only when they have the same number of locations
  ``T`` (all MLP layers have ``T = 1``); pairs with different ``T`` get ``F_c[i,j] = 0``
  (no down-sampling).  Each group of equal ``T`` is a Hadamard product of two Gram
  matrices, so ``F_c`` is positive semi-definite.  The Grams are formed in float64 from
  the per-location sums: on deep float32 networks, float32 Grams left clearly negative
  eigenvalues, and ``F_c + λI`` failed its Cholesky at damping 1e-2.

Both matrices are ``L x L`` in float64, rows in layer (flat-layout) order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.capture import Capture, LayerCapture
from curvlab.layers import LayerKind
from curvlab.numerics import SOLVE_DTYPE, compute_dtype


def restrict(layers: list[LayerKind], v: Tensor) -> Tensor:
    """``Z v``: per-layer sums of the flat vector ``v (P,)`` -> ``(L,)``."""
    return torch.stack([v[info.slice].sum() for info in layers])


def prolong(layers: list[LayerKind], c: Tensor) -> Tensor:
    """``Zᵀ c``: ``c (L,)`` spread over each layer's entries -> flat ``(P,)``."""
    return torch.cat([c[i].expand(info.num_params) for i, info in enumerate(layers)])


def location_sums(lc: LayerCapture) -> tuple[Tensor, Tensor]:
    """``σ (N, T)`` and ``ρ (C', N, T)``: feature sums of ``ā`` and ``e``, compute dtype."""
    dtype = compute_dtype(lc.a.dtype)
    return lc.a.to(dtype).sum(-1), lc.e.to(dtype).sum(-1)


def coarse_factors(capt: Capture) -> tuple[Tensor, Tensor]:
    """``(A_c, G_c)``, each ``(L, L)`` float64 (module docstring; zero across different T)."""
    sums = [location_sums(lc) for lc in capt.layers]
    num = len(sums)
    a_c = torch.zeros(num, num, dtype=SOLVE_DTYPE, device=capt.device)
    g_c = torch.zeros_like(a_c)
    groups: dict[int, list[int]] = {}
    for i, lc in enumerate(capt.layers):
        groups.setdefault(lc.a.shape[1], []).append(i)
    for idx in groups.values():
        sig = torch.stack([sums[i][0] for i in idx], dim=-1).reshape(-1, len(idx))
        rho = torch.stack([sums[i][1] for i in idx], dim=-1).reshape(-1, len(idx))
        sig, rho = sig.to(SOLVE_DTYPE), rho.to(SOLVE_DTYPE)
        rows = torch.tensor(idx, device=capt.device)
        block = (rows.unsqueeze(1), rows.unsqueeze(0))
        a_c[block] = (sig.T @ sig) / sig.shape[0]
        g_c[block] = capt.scale * (rho.T @ rho)
    return a_c, g_c


def kfac_coarse_fisher(capt: Capture) -> Tensor:
    """``F_c = A_c ∘ G_c`` of one capture, ``(L, L)`` float64."""
    a_c, g_c = coarse_factors(capt)
    return a_c * g_c


def exact_coarse_fisher(capt: Capture) -> Tensor:
    """``Z F Zᵀ = s Σ_{n,c} S_nc S_ncᵀ`` for the capture's Fisher, ``(L, L)`` float64."""
    cols = []
    for lc in capt.layers:
        sig, rho = location_sums(lc)
        cols.append(torch.einsum("cnt,nt->cn", rho, sig).reshape(-1))
    s = torch.stack(cols, dim=1).to(SOLVE_DTYPE)  # (C' N, L)
    return capt.scale * (s.T @ s)

"""Exact subsampled Fisher/GGN through the Woodbury identity.

With ``U`` the ``P x (N C')`` matrix of per-column gradients and ``F = s U Uᵀ``:

    (F + λI)⁻¹ v = (v − U (λ/s I + UᵀU)⁻¹ Uᵀ v) / λ,

where ``K = UᵀU`` is assembled layer by layer (:mod:`curvlab.curvature.gram`) and
``Uᵀ v`` / ``U c`` are computed from the captured inputs and output-gradients.  ``U``
is never formed for the network.

Numerics: ``K``, ``Uᵀ v``, ``U c`` and ``(v − U c)/λ`` are all computed in float64
(the captured float32/half quantities promoted layer by layer); results return in the
compute dtype.  ``K`` needs it as much as the vector algebra: ``K = UᵀU`` squares the
condition number of ``U``, so float32 rounding in ``K`` costs up to ``cond(U)`` times
the error that float32 data allow (measured 5–60x at small damping), while float64
assembly keeps the solve within the accuracy of the captured data.  A layer's per-sample
gradients (sums over its locations, :mod:`curvlab.curvature.gram`) are formed in float32
for such captures and promoted before they meet: a rounding of the order of the captured
data's own (within 1.01x of the attainable error in tests/test_float32_solves.py, as
when formed in float64).  They are pool buffers (:mod:`curvlab.buffers`), given
back when the object's kept dict is collected.

:class:`ExactFisher` covers all layers; :class:`BlockDiagFisher` keeps only each
layer's diagonal block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import Tensor

from curvlab import buffers
from curvlab.capture import Capture, LayerCapture
from curvlab.config import format_bytes, options
from curvlab.curvature.base import (
    TIE_RTOL,
    Curvature,
    LayerwiseCurvature,
    numerically_nonzero,
    top_count,
)
from curvlab.curvature.gram import (
    layer_gram_and_rows,
    per_sample_gradients,
    promoted_mv,
    promoted_tmv,
)
from curvlab.errors import MemoryBudgetError, OptionError, SingularMatrixError
from curvlab.independence import require_independent
from curvlab.numerics import (
    SOLVE_DTYPE,
    check_damping,
    check_finite,
    compute_dtype,
    require_positive,
)


class _Kept(dict):
    """Kept per-sample gradients by layer name; their pool buffers
    (:mod:`curvlab.buffers`) return to the pool when this dict is collected,
    i.e. when no Gram object (or copy of one) holds it any more."""

    def __init__(self) -> None:
        super().__init__()
        self.pooled: list[Tensor] = []
        weakref.finalize(self, buffers.give, self.pooled)


def _budget(memory_budget: int | None) -> int:
    """The memory budget in bytes: the given one, or ``options.memory_budget``."""
    return options.memory_budget if memory_budget is None else memory_budget


class KeepRoom:
    """Bytes that Gram objects built together (an :class:`ExactFisher` and its blocks,
    the blocks of a :class:`BlockDiagFisher`) may still spend on kept per-sample
    gradients; a kept ``U_lᵀ`` takes its bytes from ``left`` for the objects' lifetime."""

    def __init__(self, nbytes: int):
        self.left = nbytes


class GramFisher(Curvature):
    """``s U Uᵀ`` restricted to a set of layers, handled through its Gram matrix.

    Args:
        capture: The capture to read.
        layers: Which captured layers (default: all); a single layer gives a
            diagonal block.
        memory_budget: Bytes the Gram and its factorisation may take (default
            ``curvlab.config.options.memory_budget``).
        scheme: Gram scheme for layers with ``T > 1`` (``"auto"``, ``"pairs"``,
            ``"per_sample"``).
        room: Bytes left for kept per-sample gradients, shared with the objects built
            together with this one (default: a new room of half the memory budget).
    """

    def __init__(
        self,
        capture: Capture,
        layers: list[LayerCapture] | None = None,
        memory_budget: int | None = None,
        scheme: str = "auto",
        room: KeepRoom | None = None,
    ):
        self._layers = list(capture.layers if layers is None else layers)
        self.scale = capture.scale
        self.num_columns = capture.batch_size * capture.num_columns
        self.num_params = sum(lc.info.num_params for lc in self._layers)
        self.device = capture.device
        self.dtype = compute_dtype(capture.dtype)
        self._capture, self._scheme = capture, scheme
        self._sizes = [lc.info.num_params for lc in self._layers]
        budget = _budget(memory_budget)
        self._check_budget(budget)
        self._room = KeepRoom(budget // 2) if room is None else room
        self._gram: Tensor | None = None
        self._factor: tuple[float, Tensor] | None = None
        # layer name -> (U_lᵀ (N C', P_l) in its forming dtype, ∇_l (P_l,) float64 or None),
        # [W | b] row-major; the U_lᵀ are pool buffers, given back when the dict is collected
        self._kept = _Kept()

    def _check_budget(self, budget: int) -> None:
        cols = self.num_columns
        need = cols * cols * 3 * 8
        if need > budget:
            raise MemoryBudgetError(
                f"the Gram matrix has N·C' = {cols} rows and columns and needs about "
                f"{format_bytes(need)} (float64 Gram, its Cholesky factor and one "
                f"float64 assembly buffer), over the memory budget of {format_bytes(budget)}. "
                "Use a smaller batch, fisher='mc' (one column per sample), or raise the "
                "budget (memory_budget=... or curvlab.config.options.memory_budget); "
                "lower curvlab.config.options.chunk_bytes to shrink assembly temporaries."
            )

    @property
    def gram(self) -> Tensor:
        """``K = UᵀU``, ``(N C', N C')`` in float64, rows ordered ``(n, c)``."""
        if self._gram is None:
            self._assemble(cross=False)
        return self._gram

    def _assemble(self, cross: bool) -> Tensor | None:
        """Assemble and keep ``K``; with ``cross`` also return ``Uᵀ∇L`` (float64,
        ``(N C',)``) from the gradient rows, at the cost of ``N`` more output columns.

        Layers whose Gram went through their per-sample gradients ``U_lᵀ`` (formed and
        kept in float32 for float32 and half captures, promoted a column chunk at a time
        in every product) keep them, with the
        layer gradient ``∇_l`` where known (from the gradient rows, or ``r·Σ_n U_lᵀ``
        for the empirical Fisher), while they fit the shared room (:class:`KeepRoom`):
        ``Uᵀv``, ``U c`` and :meth:`natural_gradient` then use them instead of
        contracting over every location again."""
        total = torch.zeros(
            self.num_columns, self.num_columns, dtype=SOLVE_DTYPE, device=self.device
        )
        utg = (
            torch.zeros(self.num_columns, dtype=SOLVE_DTYPE, device=self.device) if cross else None
        )
        ratio = self._capture.grad_ratio
        for lc in self._layers:
            g = lc.g if utg is not None else None
            keep = max(self._room.left, 0)
            k, x, kept = layer_gram_and_rows(
                lc.a, lc.e, g, self._scheme, keep, SOLVE_DTYPE, lc.products
            )
            total += k
            if utg is not None:
                utg += x
            if kept is not None:
                u, grad = kept
                if grad is None and ratio is not None and lc.g is not None:
                    grad = u.sum(dim=0, dtype=SOLVE_DTYPE).mul_(ratio)  # empirical: g = r·e
                self._kept[lc.name] = (u, grad)
                self._kept.pooled.append(u.view(-1))
                self._room.left -= u.numel() * u.element_size()
        self._gram = total
        return utg

    @cached_property
    def blocks(self) -> dict[str, Curvature]:
        """Per-layer exact blocks (built once; each assembles its own Gram on first use)."""
        if len(self._layers) == 1:
            return {self._layers[0].name: self}
        return {
            lc.name: exact_block(self._capture, lc, scheme=self._scheme, room=self._room)
            for lc in self._layers
        }

    def _split(self, v: Tensor) -> list[Tensor]:
        return [lc.info.to_matrix(x) for lc, x in zip(self._layers, v.split(self._sizes))]

    def _ut(self, v: Tensor) -> Tensor:
        """``Uᵀ v`` as a float64 vector of length ``N C'``, order ``(n, c)``, computed in
        float64 (``a``, ``e`` and ``v`` promoted layer by layer, kept ``U_lᵀ`` a column
        chunk at a time)."""
        out = torch.zeros(self.num_columns, dtype=SOLVE_DTYPE, device=self.device)
        for lc, mat in zip(self._layers, self._split(v.to(SOLVE_DTYPE))):
            if lc.name in self._kept:
                out += promoted_mv(self._kept[lc.name][0], mat.reshape(-1))
                continue
            av = lc.a.to(SOLVE_DTYPE) @ mat.T  # (N, T, d_out)
            out += torch.einsum("cnto,nto->nc", lc.e.to(SOLVE_DTYPE), av).reshape(-1)
        return out

    def _u(self, coef: Tensor) -> Tensor:
        """``U c`` for ``c`` of length ``N C'`` (order ``(n, c)``) as a float64 flat vector."""
        return self._combine(coef.to(SOLVE_DTYPE))

    def _combine(self, coef: Tensor, lam: float | None = None) -> Tensor:
        """``U c`` (``lam`` None) or ``(∇L − U c) / λ`` from the gradient rows, as a
        float64 flat vector: per layer ``Σ_nt r_nt ā_ntᵀ`` with ``r = Σ_c c_nc e_nct`` or
        ``(g_nt − Σ_c c_nc e_nct) / λ``, or from the kept ``U_lᵀ`` (and ``∇_l``) without
        touching ``ā``."""
        cc = coef.view(self._capture.batch_size, -1)
        out = torch.empty(self.num_params, dtype=SOLVE_DTYPE, device=self.device)
        for lc, part in zip(self._layers, out.split(self._sizes)):
            kept = self._kept.get(lc.name)
            if kept is not None and (lam is None or kept[1] is not None):
                u, grad = kept
                if lam is None:
                    mat = promoted_tmv(u, coef, coef.new_zeros(u.shape[1]))
                else:
                    mat = promoted_tmv(u, coef, grad.clone(), alpha=-1.0).div_(lam)
                part.copy_(lc.info.to_flat(mat.view(lc.info.d_out, lc.info.d_in_h)))
                continue
            rows = torch.einsum("nc,cnto->nto", cc, lc.e.to(SOLVE_DTYPE))
            if lam is not None:
                rows.neg_().add_(lc.g.to(SOLVE_DTYPE)).div_(lam)
            lc.info.weight_product(rows, lc.a.to(SOLVE_DTYPE), out=part)
        return out

    def _contract(
        self, rows: Callable[[LayerCapture], Tensor], layers: list[LayerCapture] | None = None
    ) -> Tensor:
        """The flat vector of ``Σ_nt r_nt ā_ntᵀ`` per layer, with ``r = rows(layer)``
        ``(N, T, d_out)`` in float64, written layer by layer into one float64 buffer
        (``ā`` promoted to float64).  ``layers`` (default: this object's) must describe
        the same parameters as this object's layers."""
        out = torch.empty(self.num_params, dtype=SOLVE_DTYPE, device=self.device)
        for lc, part in zip(self._layers if layers is None else layers, out.split(self._sizes)):
            lc.info.weight_product(rows(lc), lc.a.to(SOLVE_DTYPE), out=part)
        return out

    def _mv(self, v: Tensor) -> Tensor:
        return self._u(self._ut(v)).mul_(self.scale).to(self.dtype)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """``(F + λI)⁻¹ v``; for the capture's own unmodified gradient and ``λ > 0``
        this is :meth:`natural_gradient` (the same vector, computed the cheaper way)."""
        if _takes_gradient_route(self._capture, v, damping) and len(self._layers) == len(
            self._capture.layers
        ):
            return self.natural_gradient(damping)
        return super().solve(v, damping)

    def _solve(self, v: Tensor, damping: float) -> Tensor:
        if damping == 0:
            return self._solve_undamped(v)
        # the factor first: assembling K keeps the per-sample gradients that Uᵀv and U c
        # then read, so that all three use the same U
        chol = self._cholesky(damping)
        coef = torch.cholesky_solve(self._ut(v).unsqueeze(1), chol)
        # (v − U c) / λ in float64, in the buffer of U c (v − U c cancels where v lies
        # in the range of U, which is where a float32 difference would lose its digits)
        out = self._u(coef.squeeze(1))
        torch.sub(v.to(SOLVE_DTYPE), out, out=out)
        return out.div_(damping).to(self.dtype)

    def _cholesky(self, damping: float) -> Tensor:
        """Lower Cholesky factor of ``λ/s·I + K`` (float64), cached per damping.

        ``K`` is symmetric, so a copy of it, damped on the diagonal, is factorised in
        place through its column-major view ``.mT`` (LAPACK's layout): no dense
        identity and no internal copy, so the factor is the only ``(N C')²`` buffer
        besides ``K``.  A previous factor is released before the new one is made.
        """
        if self._factor is None or self._factor[0] != damping:
            self._factor = None
            check_finite(self.gram, "the Gram matrix UᵀU", "The captured gradients overflow.")
            damped = self.gram.clone()
            damped.diagonal().add_(damping / self.scale)
            chol = damped.mT
            info = torch.empty((), dtype=torch.int32, device=self.device)
            torch.linalg.cholesky_ex(chol, out=(chol, info))
            if info.item() != 0:
                raise SingularMatrixError(
                    f"λ/s·I + UᵀU is not numerically positive definite at damping={damping}; "
                    "increase the damping."
                )
            self._factor = (damping, chol)
        return self._factor[1]

    def natural_gradient(self, damping: float) -> Tensor:
        """``(F + λI)⁻¹ g`` for the captured mini-batch gradient ``g`` (``λ > 0``).

        Equals ``solve(capture.grad, damping)`` but works from the gradient's output
        rows ``g_nt`` (``LayerCapture.g``), so it also serves
        ``capture(..., gradient=False)`` and needs one ``P``-sized contraction per
        layer instead of three (forming ``g``, ``Uᵀg`` and ``U c``):

        * for the empirical Fisher ``Uᵀg = r·K·1`` (``Capture.grad_ratio``), else
          ``(Uᵀg)_nc = Σ_m Σ_{t,t'} (ā_nt·ā_mt')(e_nct·g_mt')``, assembled together
          with ``K`` (the input products ``ā·ā'`` serve both) when ``K`` is not yet
          assembled, otherwise by :meth:`_utg`;
        * the result per layer as ``Σ_nt ((g_nt − Σ_c c_nc e_nct) / λ) ā_ntᵀ``, written
          into one flat buffer.

        Falls back to :meth:`solve` with ``capture.grad`` for captures without
        gradient rows.
        """
        lam = check_damping(damping, allow_zero=False)
        if any(lc.g is None for lc in self._layers):
            if self._capture.grad is None:
                raise OptionError(
                    "the capture holds neither gradient rows nor a gradient; capture with "
                    "gradient=True."
                )
            grad = torch.cat([self._capture.grad[lc.info.slice] for lc in self._layers])
            return self.solve(grad, lam)
        ratio = self._capture.grad_ratio
        if ratio is not None:
            utg = self.gram.sum(dim=1).mul_(ratio)
        elif self._gram is None:
            utg = self._assemble(cross=True)
        else:
            utg = self._utg()
        coef = torch.cholesky_solve(utg.unsqueeze(1), self._cholesky(lam)).squeeze(1)
        return self._combine(coef, lam).to(self.dtype)

    def _utg(self) -> Tensor:
        """``Uᵀ∇L`` from the gradient rows when ``K`` is already assembled: per layer
        ``Σ_m Σ_tt' (ā_nt·ā_mt')(e_nct·g_mt')`` when that is cheaper than
        ``Σ_t e_nct · (∇_l ā_nt)`` with the layer gradient ``∇_l`` (the chosen branch's
        temporaries are at most twice the size of ``a`` and ``g``), or ``U_lᵀ ∇_l`` from
        the kept per-sample gradients, in float64."""
        n, c = self._capture.batch_size, self._capture.num_columns
        utg = torch.zeros(self.num_columns, dtype=SOLVE_DTYPE, device=self.device)
        for lc in self._layers:
            kept = self._kept.get(lc.name)
            if kept is not None and kept[1] is not None:
                utg += promoted_mv(*kept)
                continue
            a, e, g = lc.a.to(SOLVE_DTYPE), lc.e.to(SOLVE_DTYPE), lc.g.to(SOLVE_DTYPE)
            t, d_in, d_out = a.shape[1], a.shape[2], e.shape[-1]
            if (n * t) ** 2 * (d_in + c * d_out) < 2 * n * t * d_in * d_out:
                aa = torch.einsum("ntk,msk->ntms", a, a)
                eg = torch.einsum("cnto,mso->nctms", e, g)
                part = torch.einsum("nctms,ntms->nc", eg, aa)
            else:
                w_g = g.reshape(-1, d_out).T @ a.reshape(-1, d_in)  # [W | b] of ∇_l
                part = torch.einsum("cnto,nto->nc", e, a @ w_g.T)
            utg += part.reshape(-1)
        return utg

    def _solve_undamped(self, v: Tensor) -> Tensor:
        if self.num_params > self.num_columns:
            raise SingularMatrixError(
                f"the Fisher has rank at most N·C' = {self.num_columns} < P = "
                f"{self.num_params}, so it is singular; pass a damping > 0."
            )
        evals, evecs = torch.linalg.eigh(self.to_dense().to(SOLVE_DTYPE))
        require_positive(evals, "the Fisher")
        x = evecs @ ((evecs.T @ v.to(SOLVE_DTYPE)) / evals)
        return x.to(self.dtype)

    def per_sample_gradients(self) -> Tensor:
        """``Uᵀ`` as ``(N C', P)``: one row per (sample, column). Small problems only."""
        rows = []
        for lc in self._layers:
            g = per_sample_gradients(lc.a.to(self.dtype), lc.e.permute(1, 0, 2, 3).to(self.dtype))
            rows.append(lc.info.to_flat(g).reshape(self.num_columns, -1))
        return torch.cat(rows, dim=1)

    def _dense(self) -> Tensor:
        u = self.per_sample_gradients()
        return self.scale * (u.T @ u)

    def eigvalsh(self) -> Tensor:
        """The ``N C'`` eigenvalues of ``s K`` (all non-zero eigenvalues of the Fisher,
        padded with zeros where ``rank < N C'``), ascending."""
        return torch.linalg.eigvalsh(self.scale * self.gram).to(self.dtype)

    def trace(self) -> Tensor:
        return (self.scale * self.gram.diagonal().sum()).to(self.dtype)

    def frobenius_norm(self) -> Tensor:
        return (self.scale * torch.linalg.matrix_norm(self.gram)).to(self.dtype)

    def squared_frobenius_norm(self) -> float:
        return float(self.scale**2 * self.gram.square().sum())

    def fisher_inner(self, layers: Sequence[LayerCapture], scale: float) -> float:
        """``‖F‖_F²`` when ``layers`` are this matrix's own; otherwise the default."""
        if [lc.name for lc in layers] == [lc.name for lc in self._layers]:
            return self.squared_frobenius_norm()
        return super().fisher_inner(layers, scale)

    def column_products(self, layers: Sequence[LayerCapture]) -> Tensor:
        """``Uᵀ F U = s K²`` when ``layers`` are this matrix's own; otherwise the default."""
        if [lc.name for lc in layers] == [lc.name for lc in self._layers]:
            return self.scale * (self.gram @ self.gram)
        return super().column_products(layers)

    def logdet_ratio(self, damping: float) -> float:
        """``log det(I + F/λ) = Σ log(1 + s κ_i / λ)`` over the Gram's eigenvalues."""
        return float(torch.log1p(self.gram_eigh[0].clamp_min(0.0) / damping).sum())

    def eigenbasis_statistics(
        self, layer: LayerCapture, scale: float
    ) -> tuple[Tensor, Tensor] | None:
        """For this matrix's own single layer: it is diagonal in its own eigenbasis, where
        the exact block's diagonal is the same, so ``D = S`` = its eigenvalues (no
        eigenbasis or eigenvalue error); otherwise ``None``."""
        if [lc.name for lc in self._layers] != [layer.name]:
            return None
        values = self.gram_eigh[0].clamp_min(0.0)
        return values, values

    @cached_property
    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        """Descending eigenvalues of ``s K`` and the Gram's eigenvectors (columns)."""
        values, vectors = torch.linalg.eigh(self.gram)
        return (self.scale * values).flip(0), vectors.flip(1)

    def nonzero_eigenvalues(self) -> Tensor:
        """The non-zero eigenvalues of ``s K`` (rank tolerance of the Gram's size)."""
        values = self.gram_eigh[0]
        return numerically_nonzero(values, values.numel(), self.dtype)

    def top_eigenvectors(self, k: int) -> tuple[Tensor, Tensor]:
        """The top-``k`` numerically non-zero eigenvalues (descending, plus any tied with
        the ``k``-th) and their unit eigenvectors ``U v / sqrt(λ_K)`` ``(P, m)``, float64."""
        values, vectors = self.gram_eigh
        m = top_count(numerically_nonzero(values, values.numel(), self.dtype), k, TIE_RTOL)
        coef = vectors[:, :m] / (values[:m] / self.scale).sqrt()
        return values[:m], self._u_columns(coef)

    def eigen_projections(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, vectors = self.top_eigenvectors(k)
        return values, x.to(SOLVE_DTYPE).T @ vectors

    def _u_columns(self, coef: Tensor) -> Tensor:
        """``U C`` for ``C`` of shape ``(N C', k)`` (rows ``(n, c)``): ``(P, k)``, float64."""
        n, k = self._capture.batch_size, coef.shape[1]
        cc = coef.reshape(n, self._capture.num_columns, k)
        parts = []
        for lc in self._layers:
            ec = torch.einsum("nck,cnto->knto", cc, lc.e.to(SOLVE_DTYPE))
            mat = torch.einsum("knto,ntj->koj", ec, lc.a.to(SOLVE_DTYPE))
            parts.append(lc.info.to_flat(mat))
        return torch.cat(parts, dim=1).T


class ExactFisher(GramFisher):
    """The full-network subsampled Fisher/GGN ``F = s U Uᵀ`` (type from the capture).

    ``solve(v, λ) = (F + λI)⁻¹ v`` through Woodbury (Cholesky of ``λ/s I + K`` in
    float64, cached per λ); ``natural_gradient(λ)`` is the same for the captured
    gradient, computed from its output rows.  ``blocks`` are the diagonal per-layer
    blocks.
    """

    def __init__(self, capture: Capture, memory_budget: int | None = None, scheme: str = "auto"):
        require_independent(capture.coupling, type(self).__name__)
        super().__init__(capture, None, memory_budget, scheme)


class BlockDiagFisher(LayerwiseCurvature):
    """Block-diagonal exact Fisher/GGN: one exact (Woodbury) block per layer.

    A layer's weight and bias form one block.
    """

    def __init__(self, capture: Capture, memory_budget: int | None = None, scheme: str = "auto"):
        require_independent(capture.coupling, "BlockDiagFisher")
        room = KeepRoom(_budget(memory_budget) // 2)
        super().__init__(
            {
                lc.name: exact_block(capture, lc, memory_budget, scheme, room)
                for lc in capture.layers
            }
        )
        self._capture = capture

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """``(F_bd + λI)⁻¹ v``; for the capture's own unmodified gradient and ``λ > 0``
        this is :meth:`natural_gradient`."""
        if _takes_gradient_route(self._capture, v, damping):
            return self.natural_gradient(damping)
        return super().solve(v, damping)

    def natural_gradient(self, damping: float) -> Tensor:
        """``(F_bd + λI)⁻¹ g`` for the captured gradient, block by block
        (:meth:`ExactFisher.natural_gradient` of each layer's block)."""
        return torch.cat([blk.natural_gradient(damping) for blk in self.blocks.values()])


def exact_block(
    capture: Capture,
    layer: LayerCapture,
    memory_budget: int | None = None,
    scheme: str = "auto",
    room: KeepRoom | None = None,
) -> GramFisher:
    """The exact diagonal block ``F_ll`` of ``layer`` (a one-layer :class:`GramFisher`).

    One object per capture, layer and scheme while any curvature object holds it
    (``Capture.exact_blocks``): :class:`ExactFisher`'s and :class:`BlockDiagFisher`'s
    blocks and the exact blocks that KFAC, EKFAC and FOOF keep for layers without
    Kronecker factors are the same matrix, assembled once.  ``memory_budget`` is checked
    for every caller; ``room`` only matters for the object that is built here.
    """
    block = capture.exact_blocks.get((layer.name, scheme))
    if block is None:
        block = GramFisher(capture, [layer], memory_budget, scheme, room)
        capture.exact_blocks[(layer.name, scheme)] = block
    else:
        block._check_budget(_budget(memory_budget))
    return block


def _takes_gradient_route(capture: Capture, v: Tensor, damping: float) -> bool:
    """Whether ``solve(v, damping)`` may run as ``natural_gradient(damping)``: ``v`` is
    the capture's own unmodified gradient (checked by identity, storage and version
    counter, never by value), the damping is positive and the gradient rows exist."""
    return (
        isinstance(v, Tensor)
        and capture.is_own_gradient(v)
        and isinstance(damping, (int, float))
        and damping > 0
        and all(lc.g is not None for lc in capture.layers)
    )

"""Per-layer Gram matrices ``K_l = U_lᵀ U_l`` from layer inputs and output-gradients.

``U_l`` holds one column per (sample n, Fisher column c): the gradient of
``g_ncᵀ f_n`` w.r.t. the layer's ``[W | b]``, i.e. ``Σ_t e_nct ā_ntᵀ``.  Its Gram is

    K_l[(n,c), (m,d)] = Σ_{t,t'} (ā_nt · ā_mt') (e_nct · e_mdt'),

assembled without ever forming ``U`` for the network.  Two exact schemes exist for
``T > 1`` (conv, sequences); :func:`choose_scheme` picks the cheaper one:

* ``"pairs"``: the location-pair double sum, ``O((N C' T)² d_out + (N T)² d_in)``;
* ``"per_sample"``: the layer's per-sample gradients ``(N C', d_out d_in)`` and their
  Gram, ``O(N C' T d_out d_in + (N C')² d_out d_in)``.

Rows are ordered ``(n, c)`` (sample-major).  Work is chunked over rows so that
temporaries stay within ``curvlab.config.options.chunk_bytes``.  The location-pair Gram
is assembled from its lower block triangle.  Per-sample gradients (sums over locations)
are formed in float32 for float32 and half captures and promoted one cache-sized column
chunk at a time in every product (:func:`promoted_mm`), so Grams requested in float64
accumulate in float64 without a float64 copy of the per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvlab import buffers
from curvlab.config import options
from curvlab.layers.base import LocationProducts
from curvlab.numerics import (
    SYMMETRIC_BLOCKS,
    SYMMETRIC_MIN_ROWS,
    check_choice,
    long_tmm,
    symmetric_block_rows,
    symmetric_mm,
)

SCHEMES = ("auto", "pairs", "per_sample")


def scheme_costs(
    n: int, c: int, t: int, d_in: int, d_out: int, products: LocationProducts | None = None
) -> dict[str, float]:
    """Multiply-add counts of the two schemes for one layer (the location products
    ``ā·ā'`` through ``products`` when given)."""
    rows = n * c
    inputs = (n * t) ** 2 * d_in if products is None else products.cost(n)
    return {
        "pairs": (rows * t) ** 2 * (d_out + 1) + inputs,
        "per_sample": rows * t * d_out * d_in + rows**2 * d_out * d_in,
    }


def choose_scheme(
    n: int, c: int, t: int, d_in: int, d_out: int, products: LocationProducts | None = None
) -> str:
    """The cheaper exact scheme (``"pairs"`` when ``T = 1``, where both coincide)."""
    if t == 1:
        return "pairs"
    costs = scheme_costs(n, c, t, d_in, d_out, products)
    return min(costs, key=costs.get)


def _rows_per_chunk(bytes_per_row: int, element_size: int) -> int:
    return max(1, options.chunk_bytes // max(1, bytes_per_row * element_size))


def layer_gram(a: Tensor, e: Tensor, scheme: str = "auto") -> Tensor:
    """Exact Gram of one layer.

    Args:
        a: Homogeneous inputs ``(N, T, d_in_h)``.
        e: Output-gradient columns ``(C', N, T, d_out)``.
        scheme: ``"auto"``, ``"pairs"`` or ``"per_sample"``.

    Returns:
        ``K_l`` of shape ``(N C', N C')`` in the dtype of ``a``, rows ordered ``(n, c)``.
    """
    return _assemble(a, e, None, scheme, 0, a.dtype)[0]


def layer_gram_and_cross(
    a: Tensor, e: Tensor, g: Tensor, scheme: str = "auto"
) -> tuple[Tensor, Tensor]:
    """One layer's Gram ``K_l`` and ``U_lᵀ ∇_l``, sharing the input products.

    ``∇_l = Σ_mt g_mt ā_mtᵀ`` is the layer's part of the mini-batch gradient, so
    ``(U_lᵀ ∇_l)_nc = Σ_m Σ_{t,t'} (ā_nt·ā_mt')(e_nct·g_mt')``: the products ``ā·ā'``
    that ``K_l`` needs serve both, and the gradient rows join the output products as
    ``N`` extra columns.

    Args:
        a: Homogeneous inputs ``(N, T, d_in_h)``.
        e: Output-gradient columns ``(C', N, T, d_out)``.
        g: The gradient's output rows ``(N, T, d_out)``.
        scheme: ``"auto"``, ``"pairs"`` or ``"per_sample"``.

    Returns:
        ``K_l`` ``(N C', N C')`` and ``U_lᵀ ∇_l`` ``(N C',)``, in the dtype of ``a``,
        ordered ``(n, c)``.
    """
    gram, cross, _ = _assemble(a, e, g, scheme, 0, a.dtype)
    assert cross is not None
    return gram, cross


def layer_gram_and_rows(
    a: Tensor,
    e: Tensor,
    g: Tensor | None,
    scheme: str = "auto",
    keep_bytes: int = 0,
    dtype: torch.dtype | None = None,
    products: LocationProducts | None = None,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor | None] | None]:
    """:func:`layer_gram_and_cross` (``U_lᵀ ∇_l`` only when ``g`` is given), and the
    layer's per-column gradients ``U_lᵀ`` ``(N C', d_out·d_in_h)`` with its gradient
    ``∇_l`` (``None`` without ``g``), both ``[W | b]`` row-major, when the per-sample
    scheme formed them and ``U_lᵀ`` takes at most ``keep_bytes``; else ``None``.  With
    them ``U_l c`` costs ``N C' P_l`` instead of a contraction over every location.

    ``dtype`` (default: that of ``a``) is the dtype of the Gram, the cross term and
    ``∇_l``.  The location-pair scheme promotes ``a``, ``e`` and ``g`` to it first.  The
    per-sample scheme forms ``U_lᵀ`` and ``∇_l`` (sums over locations) in
    :func:`forming_dtype` and promotes them to ``dtype`` in every product of two of them
    (:func:`promoted_mm`), so a float32 capture's Gram is still assembled in float64 (its
    per-sample gradients carry float32 rounding of the order of the captured data's
    own); a kept ``U_lᵀ`` stays in the forming dtype and is a pool buffer
    (:mod:`curvlab.buffers`) that the caller gives back when done with it.

    ``products`` (``LayerCapture.products``), when given, is a cheaper route to the
    location products ``ā·ā'`` that the location-pair scheme then takes (and the
    scheme choice counts)."""
    return _assemble(a, e, g, scheme, keep_bytes, dtype or a.dtype, products)


def forming_dtype(dtype: torch.dtype, result: torch.dtype) -> torch.dtype:
    """Dtype in which per-sample gradients and layer gradients (sums over locations of
    captured products) are formed for captured ``dtype`` and results in ``result``:
    float32 for float32 and half captures, never wider than ``result``."""
    formed = torch.promote_types(dtype, torch.float32)
    return result if result.itemsize < formed.itemsize else formed


def _assemble(
    a: Tensor,
    e: Tensor,
    g: Tensor | None,
    scheme: str,
    keep_bytes: int,
    dtype: torch.dtype,
    products: LocationProducts | None = None,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor | None] | None]:
    check_choice("scheme", scheme, SCHEMES)
    c, n, t, d_out = e.shape
    if scheme == "auto":
        scheme = choose_scheme(n, c, t, a.shape[-1], d_out, products)
    if scheme == "per_sample":
        return _gram_per_sample(a, e.permute(1, 0, 2, 3), g, keep_bytes, dtype)
    e = e.to(dtype)
    g = None if g is None else g.to(dtype)
    ee = e.permute(1, 0, 2, 3)  # (N, C', T, d_out)
    if t == 1:
        a = a.to(dtype)
        gram, cross = _gram_single_location(a[:, 0], ee[:, :, 0], None if g is None else g[:, 0])
    else:
        a_flat = None if products is not None else a.to(dtype).reshape(n * t, -1)

        def location_products(i: int, j: int) -> Tensor:
            if a_flat is None:
                return products(i, j, j, dtype)
            return (a_flat[i * t : j * t] @ a_flat[: j * t].T).view(j - i, t, j, t)

        gram, cross = _pairs_symmetric(location_products, ee, g)
    return gram, cross, None


def _gram_single_location(a: Tensor, e: Tensor, g: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """T = 1: ``K = (A Aᵀ ⊗ 1 1ᵀ) ∘ (E Eᵀ)`` with ``a (N, d)``, ``e (N, C', o)``; with
    gradient rows ``g (N, o)`` also ``Σ_m (A Aᵀ)_nm (e_nc·g_m)``.

    Both symmetric products are formed from their lower block triangles only and
    mirrored (:func:`~curvlab.numerics.symmetric_mm`)."""
    n, c, o = e.shape
    flat = e.reshape(n * c, o)
    out = torch.empty(n * c, n * c, dtype=a.dtype, device=a.device)
    cross = None if g is None else a.new_empty(n * c)
    row_bytes = c * (n * c + (0 if g is None else n))
    step = min(_rows_per_chunk(row_bytes, a.element_size()), symmetric_block_rows(n))
    aa = symmetric_mm(a, step)
    for i in range(0, n, step):
        j = min(i + step, n)
        rows = flat[i * c : j * c]
        block = torch.mm(rows, flat[: j * c].T, out=out[i * c : j * c, : j * c])
        block.view(j - i, c, j, c).mul_(aa[i:j, None, :j, None])
        out[: i * c, i * c : j * c] = out[i * c : j * c, : i * c].T
        if cross is not None:
            eg = (rows @ g.T).view(j - i, c, n)
            cross[i * c : j * c] = (eg * aa[i:j, None, :]).sum(-1).reshape(-1)
    return out, cross


def _pairs_symmetric(
    products: Callable[[int, int], Tensor], e: Tensor, g: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The whole location-pair Gram of ``e (N, C', T, o)`` and the location products
    ``products(i, j) = ā_nt·ā_ms`` ``(j − i, T, j, T)`` (samples ``n`` in ``[i, j)``,
    ``m < j``) from its lower block triangle (the samples of a block against those up to
    the block's end), mirrored; with gradient rows ``g (N, T, o)`` also
    ``Σ_m Σ_tt' (ā_nt·ā_mt')(e_nct·g_mt')``.

    Each block's input products ``ā·ā'`` (the dominant cost for wide inputs) serve both
    ``n``'s cross term and, by their symmetry, that of the earlier samples ``m``, so every
    product of two samples' rows is formed once.  Blocks hold at least
    ``SYMMETRIC_MIN_ROWS`` location rows and at most ``chunk_bytes`` of temporaries."""
    n, c, t, o = e.shape
    e_flat = e.reshape(n * c * t, o)
    g_flat = None if g is None else g.reshape(n * t, o)
    out = torch.empty(n * c, n * c, dtype=e.dtype, device=e.device)
    cross = None if g is None else e.new_zeros(n * c)
    blocks = max(-(-n // SYMMETRIC_BLOCKS), -(-SYMMETRIC_MIN_ROWS // t))
    step = min(_rows_per_chunk(t * t * n * (c + 1) ** 2, e.element_size()), blocks)
    for i in range(0, n, step):
        j = min(i + step, n)
        b = j - i
        rows = e_flat[i * c * t : j * c * t]
        ee = (rows @ e_flat[: j * c * t].T).view(b, c, t, j, c, t)
        aa = products(i, j)
        block = torch.einsum("bxtmys,btms->bxmy", ee, aa).reshape(b * c, j * c)
        out[i * c : j * c, : j * c] = block
        out[: i * c, i * c : j * c] = block[:, : i * c].T
        if cross is None:
            continue
        eg = (rows @ g_flat[: j * t].T).view(b, c, t, j, t)  # e_nct·g_ms, s up to the block
        cross[i * c : j * c] += torch.einsum("bxtms,btms->bx", eg, aa).reshape(-1)
        if i:  # the earlier samples m: e_mys·g_nt with the same ā_nt·ā_ms
            ge = (e_flat[: i * c * t] @ g_flat[i * t : j * t].T).view(i, c, t, b, t)
            cross[: i * c] += torch.einsum("mysbt,btms->my", ge, aa[:, :, :i]).reshape(-1)
    return out, cross


def _pairs_rows(
    a_rows: Tensor, e_rows: Tensor, a_all: Tensor, e_all: Tensor, g_all: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Rows ``K[(n,c), :]`` of the location-pair double sum for the samples of ``a_rows
    (b, T, d)``, ``e_rows (b, C', T, o)`` against ``a_all (N, T, d)``, ``e_all (N, C', T, o)``;
    with gradient rows ``g_all (N, T, o)`` also the rows' ``Σ_m Σ_tt' (ā·ā')(e·g)``."""
    b_all, c, t, o = e_rows.shape
    n = a_all.shape[0]
    e_flat = e_all.reshape(n * c * t, o)
    cols = e_flat if g_all is None else torch.cat([e_flat, g_all.reshape(n * t, o)])
    a_flat = a_all.reshape(n * t, a_all.shape[-1])
    out = torch.empty(b_all * c, n * c, dtype=a_rows.dtype, device=a_rows.device)
    cross = None if g_all is None else a_rows.new_empty(b_all * c)
    step = _rows_per_chunk(c * t * cols.shape[0], a_rows.element_size())
    for i in range(0, b_all, step):
        j = min(i + step, b_all)
        b = j - i
        prod = e_rows[i:j].reshape(b * c * t, o) @ cols.T
        ee = prod[:, : n * c * t].view(b, c, t, n, c, t)
        aa = (a_rows[i:j].reshape(b * t, -1) @ a_flat.T).view(b, t, n, t)
        if t == 1:
            block = ee[:, :, 0, :, :, 0] * aa[:, 0, :, 0].view(b, 1, n, 1)
        else:
            block = torch.einsum("bxtmys,btms->bxmy", ee, aa)
        out[i * c : j * c] = block.reshape(b * c, n * c)
        if cross is not None:
            eg = prod[:, n * c * t :].view(b, c, t, n, t)
            cross[i * c : j * c] = torch.einsum("bxtms,btms->bx", eg, aa).reshape(-1)
    return out, cross


def gram_rows(a_rows: Tensor, e_rows: Tensor, a_all: Tensor, e_all: Tensor, scheme: str) -> Tensor:
    """One layer's Gram rows ``K[(n,c), (m,d)]`` for the samples ``n`` of ``a_rows``.

    Args:
        a_rows, e_rows: The rows' inputs ``(b, T, d_in_h)`` and columns ``(C', b, T, o)``.
        a_all, e_all: All samples' (``(N, T, d_in_h)``, ``(C', N, T, o)``).
        scheme: ``"pairs"`` or ``"per_sample"``.

    Returns:
        ``(b C', N C')`` in the dtype of ``a_rows``, rows and columns ordered ``(n, c)``.
    """
    er, ea = e_rows.permute(1, 0, 2, 3), e_all.permute(1, 0, 2, 3)  # (., C', T, o)
    if scheme == "pairs":
        return _pairs_rows(a_rows, er, a_all, ea)[0]
    check_choice("scheme", scheme, ("pairs", "per_sample"))
    b, c = er.shape[:2]
    g_all = per_sample_gradients(a_all, ea).reshape(a_all.shape[0] * c, -1)
    out = torch.empty(b * c, g_all.shape[0], dtype=a_rows.dtype, device=a_rows.device)
    step = _rows_per_chunk(c * g_all.shape[1], a_rows.element_size())
    for i in range(0, b, step):
        j = min(i + step, b)
        g = per_sample_gradients(a_rows[i:j], er[i:j]).reshape((j - i) * c, -1)
        out[i * c : j * c] = g @ g_all.T
    return out


def per_sample_gradients(a: Tensor, e: Tensor, out: Tensor | None = None) -> Tensor:
    """``Σ_t e_nct ā_ntᵀ`` for ``a (N, T, d)``, ``e (N, C', T, o)`` -> ``(N, C', o, d)``,
    written into ``out`` (contiguous, ``N C' o d`` elements) when given."""
    if out is None:
        return torch.einsum("ncto,ntk->ncok", e, a)
    n, c, t, o = e.shape
    rows = e.transpose(-1, -2).reshape(n, c * o, t)
    return torch.bmm(rows, a, out=out.view(n, c * o, a.shape[-1])).view(n, c, o, -1)


# Columns are promoted in slabs of about this many bytes (float64), a stack of one slab per
# intra-op thread at a time: the stack is copied and multiplied slab by slab (batched
# products), so each thread reads back, from its own core's cache, the slab it promoted.
# One chunk shared across the threads measured up to 2x slower on 2 cores, in processes
# where its halves crossed between the cores' caches, and the product of the whole
# promoted matrix 1.1-1.25x slower even before its promotion (benchmarks/RESULTS.md Q5).
PROMOTE_SLAB_BYTES = 2**20


def _slabs(rows: int) -> tuple[int, int]:
    """``(slabs, width)``: slabs per promoted stack and columns per slab for ``rows`` rows."""
    width = min(max(PROMOTE_SLAB_BYTES // (8 * max(1, rows)), 256), 65536)
    return max(2, torch.get_num_threads()), width


def _promoted_chunks(
    x: Tensor, dtype: torch.dtype, extra: Tensor | None = None
) -> Iterator[tuple[int, Tensor]]:
    """``(i, s)`` over the columns of ``x (R, P)``: ``s (k, R, w)`` in ``dtype`` holds
    columns ``i + j w`` to ``i + (j+1) w`` of ``x`` in slab ``j`` (a full stack of
    equal slabs, then one narrower slab for the last columns), copied into one reused
    pool buffer (:mod:`curvlab.buffers`; a fresh allocation per chunk costs more than
    its copy); ``s`` is valid until the next one is yielded.  With ``extra (P,)`` (of
    ``dtype``) each slab has one more row, ``extra``'s matching part."""
    r, p = x.shape
    rows = r + (extra is not None)
    slabs, w = _slabs(r)
    # room for the extra row and the full width either way: one pool size per (R, dtype)
    flat = buffers.take(slabs * (r + 1) * w, dtype, x.device)
    try:
        i = 0
        while i < p:
            k = min(slabs, (p - i) // w)
            width = w if k else p - i
            k = max(k, 1)
            s = flat[: k * rows * width].view(k, rows, width)
            s[:, :r].copy_(x[:, i : i + k * width].view(r, k, width).transpose(0, 1))
            if extra is not None:
                s[:, r].copy_(extra[i : i + k * width].view(k, width))
            yield i, s
            i += k * width
    finally:
        buffers.give([flat])


def promoted_mm(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``x yᵀ`` in ``dtype`` for ``x (R, P)``, ``y (S, P)`` of ``dtype`` or a narrower
    dtype (then promoted a column chunk at a time)."""
    if x.dtype == dtype and y.dtype == dtype:
        return x @ y.T
    if y is x:
        return promoted_gram_mv(x, None, dtype)[0]
    acc = torch.zeros(_slabs(x.shape[0])[0], x.shape[0], y.shape[0], dtype=dtype, device=x.device)
    for i, s in _promoted_chunks(x, dtype):
        k, _, w = s.shape
        ys = y[:, i : i + k * w].view(y.shape[0], k, w).transpose(0, 1).to(dtype)
        acc[:k].baddbmm_(s, ys.mT)
    return acc.sum(0)


def promoted_gram_mv(
    x: Tensor, v: Tensor | None, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor | None]:
    """``x xᵀ`` and ``x v`` (``None`` without ``v``) in ``dtype`` (``v``'s when given)
    for ``x (R, P)`` of that dtype or a narrower one: each column chunk is promoted once,
    ``v`` as one more row, and one product gives both."""
    dtype = dtype if v is None else v.dtype
    if x.dtype == dtype:
        return x @ x.T, None if v is None else x @ v
    r = x.shape[0]
    rows = r + (v is not None)
    acc = torch.zeros(_slabs(r)[0], rows, rows, dtype=dtype, device=x.device)
    for _, s in _promoted_chunks(x, dtype, extra=v):
        acc[: s.shape[0]].baddbmm_(s, s.mT)
    out = acc.sum(0)
    return out[:r, :r], None if v is None else out[:r, r]


def promoted_mv(x: Tensor, v: Tensor) -> Tensor:
    """``x v`` in ``v``'s dtype for ``x (R, P)`` of that dtype or a narrower one."""
    if x.dtype == v.dtype:
        return x @ v
    r = x.shape[0]
    acc = v.new_zeros(_slabs(r)[0], r, 1)
    for i, s in _promoted_chunks(x, v.dtype):
        k, _, w = s.shape
        acc[:k].baddbmm_(s, v[i : i + k * w].view(k, w, 1))
    return acc.sum(0).view(r)


def promoted_tmv(x: Tensor, c: Tensor, out: Tensor, alpha: float = 1.0) -> Tensor:
    """``out + α xᵀ c`` in place (``out``'s dtype) for ``x (R, P)`` of that dtype or a
    narrower one, ``c (R,)``, ``out (P,)``."""
    if x.dtype == out.dtype:
        return out.addmv_(x.T, c, alpha=alpha)
    r = x.shape[0]
    for i, s in _promoted_chunks(x, out.dtype):
        k, _, w = s.shape
        # cᵀ times each slab (reading it row by row, as it lies), into out's part
        part = out[i : i + k * w].view(k, 1, w)
        part.baddbmm_(c.view(1, 1, r).expand(k, 1, r), s, alpha=alpha)
    return out


def _gram_per_sample(
    a: Tensor, e: Tensor, g: Tensor | None, keep_bytes: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor | None] | None]:
    """Gram of the per-sample gradients of ``a (N, T, d)``, ``e (N, C', T, o)``; with
    gradient rows ``g (N, T, o)`` also their products with the gradient ``Σ_nt g_nt ā_ntᵀ``;
    the per-sample gradients ``(N C', o d)`` and that gradient (``None`` without ``g``)
    when they take at most ``keep_bytes`` in ``dtype``.

    Per-sample gradients and the gradient are formed in :func:`forming_dtype` (chunks of
    samples within ``chunk_bytes``); every product of two of them runs in ``dtype``, the
    dtype of all results (:func:`promoted_mm`), and kept per-sample gradients stay in
    the forming dtype.  When they fit ``keep_bytes`` or one chunk they are formed once,
    in one piece; otherwise the Gram is assembled block by block, forming each chunk
    again per block (the memory-bounded fallback)."""
    n, c, _, o = e.shape
    d = a.shape[-1]
    width = o * d
    form = forming_dtype(a.dtype, dtype)
    a, e = a.to(form), e.to(form)

    def rows(i: int, j: int) -> Tensor:
        return per_sample_gradients(a[i:j], e[i:j]).reshape((j - i) * c, width)

    grad = None
    if g is not None:
        grad = long_tmm(g.to(form).reshape(-1, o), a.reshape(-1, d)).reshape(-1).to(dtype)
    keep = n * c * width * form.itemsize <= keep_bytes
    step = _rows_per_chunk(c * width, a.element_size())
    if keep or step >= n:
        u = buffers.take(n * c * width, form, a.device).view(n * c, width)
        for i in range(0, n, step):
            j = min(i + step, n)
            per_sample_gradients(a[i:j], e[i:j], out=u[i * c : j * c])
        gram, cross = promoted_gram_mv(u, grad, dtype)
        if keep:
            return gram, cross, (u, grad)
        buffers.give([u.view(-1)])
        return gram, cross, None
    out = torch.empty(n * c, n * c, dtype=dtype, device=a.device)
    cross = None if grad is None else out.new_empty(n * c)
    chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
    for i, j in chunks:
        gi = rows(i, j)
        if cross is not None:
            cross[i * c : j * c] = promoted_mv(gi, grad)
        for k, m in chunks:
            if k < i:
                continue
            gk = gi if k == i else rows(k, m)
            block = promoted_mm(gi, gk, dtype)
            out[i * c : j * c, k * c : m * c] = block
            out[k * c : m * c, i * c : j * c] = block.T
    return out, cross, None

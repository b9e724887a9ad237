"""Convolutions ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` as matrix layers.

Every convolution is written as a zero-padding, stride-``s``, dilation-``d`` convolution
of an unfolded input with a matrix ``W̄`` of shape ``(C_out, C_in/G·∏k)`` per group
(plus a bias column):

* ``nn.Conv*``: the input padded explicitly — with zeros, or for ``padding_mode``
  ``'reflect'``, ``'replicate'``, ``'circular'`` exactly as PyTorch pads it
  (``padding='same'`` included) — then ``W̄ = weight.reshape(C_out, -1)``.
* ``nn.ConvTranspose*`` (the adjoint of a convolution): the input dilated by the stride
  (``s − 1`` zeros between entries), padded by ``d(k − 1) − p`` on both sides plus
  ``output_padding`` on the far side (a negative pad crops), then a stride-1 convolution
  with the flipped kernel and the channel roles swapped:
  ``W̄[g·o + j, (i, κ)] = weight[g·i_g + i, j, k − 1 − κ]``.  The flat layout stays the
  weight ``(C_in, C_out/G, *k)`` row-major, then the bias; :class:`ConvMatrix` maps.

With ``G = groups > 1`` group ``g`` multiplies only its own input channels' patches
``ā_ntg`` and writes only its output channels, ``Γ_nc = ⊕_g Σ_t e_nctg ā_ntgᵀ``: a
:class:`GroupedConvKind` is read through these per-sample gradients (one ``einsum``, no
``torch.func``), and keeps each group's rows so that the Kronecker methods build one
factor pair ``A_g ⊗ G_g`` per group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab import buffers
from curvlab.config import options
from curvlab.layers.base import BlockLayout, Layout, MatrixKind, ModuleCall, PerSampleKind
from curvlab.numerics import long_tmm

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class ConvGeometry:
    """The equivalent zero-padding convolution of a conv or transposed-conv module.

    Attributes:
        kernel, stride, dilation: Per spatial dimension.
        pads: ``F.pad`` amounts (last spatial dimension first, left then right).
        pad_mode: ``F.pad`` mode (``'constant'`` for zeros).
        input_stride: Zeros inserted between input entries plus one (transposed: the
            module's stride; 1 for a convolution).
        groups: The module's ``groups``.
        transposed: Whether the module is a transposed convolution.
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    pad_mode: str
    input_stride: tuple[int, ...]
    groups: int
    transposed: bool

    @classmethod
    def of(cls, m: nn.Module) -> ConvGeometry:
        kernel, dilation = tuple(m.kernel_size), tuple(m.dilation)
        ones = (1,) * len(kernel)
        if not m.transposed:
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            pads = tuple(m._reversed_padding_repeated_twice)
            return cls(kernel, tuple(m.stride), dilation, pads, mode, ones, m.groups, False)
        pads: list[int] = []
        for k, d, p, op in reversed(list(zip(kernel, dilation, m.padding, m.output_padding))):
            pads += [d * (k - 1) - p, d * (k - 1) - p + op]
        return cls(kernel, ones, dilation, tuple(pads), "constant", tuple(m.stride), m.groups, True)


def padded_input(x: Tensor, geo: ConvGeometry, fill: float = 0.0) -> Tensor:
    """``(N, C, *spatial)`` -> the grid the equivalent zero-padding convolution reads:
    dilated by ``geo.input_stride`` (transposed convolutions) and padded by ``geo.pads``
    with ``geo.pad_mode``; inserted entries and constant padding hold ``fill``."""
    if any(s > 1 for s in geo.input_stride):
        size = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], geo.input_stride)]
        dilated = x.new_full((*x.shape[:2], *size), fill)
        dilated[(..., *(slice(None, None, s) for s in geo.input_stride))] = x
        x = dilated
    if not any(geo.pads):
        return x
    if geo.pad_mode == "constant":
        return F.pad(x, list(geo.pads), value=fill)
    return F.pad(x, list(geo.pads), mode=geo.pad_mode)


def conv_patches(x: Tensor, geo: ConvGeometry, bias: bool) -> Tensor:
    """Unfold a conv input ``(N, C_in, *spatial)`` into patch rows ``(N, T, G, C_in/G·∏k)``
    (columns in ``(channel, *kernel)`` order within each group), with a trailing 1 per
    group when ``bias``.  ``T`` is the number of output locations.

    The patches are a strided window view of the dilated and padded input, copied into
    the output.  For kernels of more than one entry the input is made channels-last
    first and the copy runs once per index of all kernel dimensions but the last: each
    copy then moves runs of the last kernel dimension and the channels with short
    strides on both sides (about 2x faster on 3x3 kernels than one copy whose innermost
    loops are the kernel window alone).
    """
    nd = len(geo.kernel)
    x = padded_input(x, geo)
    windows = x.movedim(1, -1)  # (N, *padded, C)
    if math.prod(geo.kernel) > 1:
        windows = windows.contiguous()
    for dim, (k, s, d) in enumerate(zip(geo.kernel, geo.stride, geo.dilation), start=1):
        windows = windows.unfold(dim, d * (k - 1) + 1, s)
    windows = windows[(..., *(slice(None, None, d) for d in geo.dilation))]  # (N,*out,C,*k)
    n, c = windows.shape[0], windows.shape[1 + nd]
    spatial = windows.shape[1 : 1 + nd]
    c_g = c // geo.groups
    d_in = c_g * math.prod(geo.kernel)
    shape = (n, math.prod(spatial), geo.groups, d_in + int(bias))
    out = buffers.lend(math.prod(shape), x.dtype, x.device).view(shape)
    patches = out[..., :d_in].unflatten(1, spatial).unflatten(-1, (c_g, *geo.kernel))
    windows = windows.unflatten(1 + nd, (geo.groups, c_g))  # (N, *out, G, C/G, *k)
    for index in itertools.product(*map(range, geo.kernel[:-1])):
        at = (..., *index, slice(None))
        patches[at].copy_(windows[at])
    if bias:
        out[..., d_in] = 1
    return out


@dataclass(frozen=True)
class InputProducts:
    """The location products ``ā_nt · ā_ms`` of a ``groups=1`` convolution's patch rows,
    from its input's channel products: patches read the padded (transposed: dilated and
    padded) input at kernel offsets, so

        ā_nt · ā_ms = Σ_κ x̃_n[:, q(t) + κ] · x̃_m[:, q(s) + κ]  (+ 1 for the bias column)

    over the kernel offsets ``κ`` (dilated), with ``q(t)`` the corner of location ``t``'s
    window on the padded grid ``x̃``.  The channel products of the input's own positions
    are spread over the padded grid (each grid position is an input position, copied by
    the padding mode, or a zero), and each offset adds one strided window of that grid.
    For a stride-1 convolution this takes about ``∏k`` times fewer multiply-adds than
    the patches' own products.

    Attributes:
        x: The layer input, ``(N, C_in, S)`` (spatial positions flattened).
        grid: ``(∏ padded shape,)``: the input position at each padded-grid position,
            ``S`` where the grid holds a zero (zero padding, or the zeros a transposed
            convolution inserts).
        geo: The convolution's geometry.
        padded, out: Spatial shapes of the padded grid and of the output.
        bias: Whether the patch rows end with a 1 for a bias.
    """

    x: Tensor
    grid: Tensor
    geo: ConvGeometry
    padded: tuple[int, ...]
    out: tuple[int, ...]
    bias: bool

    @classmethod
    def of(cls, x: Tensor, geo: ConvGeometry, bias: bool) -> InputProducts:
        """For a ``groups=1`` convolution of geometry ``geo``, input ``(N, C_in, *spatial)``."""
        spatial = x.shape[2:]
        size = math.prod(spatial)
        pos = torch.arange(size, dtype=torch.float64, device=x.device).view(1, 1, *spatial)
        pos = padded_input(pos, geo, fill=-1.0)  # each grid entry's input position, or -1
        padded = tuple(pos.shape[2:])
        out = tuple(
            (n - d * (k - 1) - 1) // s + 1
            for n, k, s, d in zip(padded, geo.kernel, geo.stride, geo.dilation)
        )
        grid = pos.flatten().long()
        grid[grid < 0] = size
        return cls(x.flatten(2), grid, geo, padded, out, bias)

    def cost(self, n: int) -> float:
        """Multiply-adds of all ``N² T²`` products for ``n`` samples."""
        c, s = self.x.shape[1], self.x.shape[2]
        t = math.prod(self.out)
        return (n * s) ** 2 * c + math.prod(self.geo.kernel) * (n * t) ** 2

    def __call__(self, lo: int, hi: int, upto: int, dtype: torch.dtype) -> Tensor:
        """``ā_nt · ā_ms`` for samples ``n`` in ``[lo, hi)`` and ``m < upto``, as
        ``(hi − lo, T, upto, T)`` in ``dtype`` (channel products formed in ``dtype``).

        Samples ``n`` are taken a few at a time, so that the padded grid of their
        products stays within ``curvlab.config.options.chunk_bytes``."""
        t = math.prod(self.out)
        out = torch.empty(hi - lo, t, t, upto, dtype=dtype, device=self.x.device)
        cols = self.x[:upto].to(dtype).transpose(1, 2).reshape(-1, self.x.shape[1])
        per_sample = (math.prod(self.padded) + 1) ** 2 * upto * out.element_size()
        step = max(1, options.chunk_bytes // per_sample)
        for i in range(lo, hi, step):
            j = min(i + step, hi)
            self._products(i, j, cols, out[i - lo : j - lo])
        return out.transpose(2, 3)

    def _products(self, lo: int, hi: int, cols: Tensor, out: Tensor) -> None:
        """Write ``ā_nt · ā_ms`` of samples ``[lo, hi)`` into ``out (hi − lo, T, T, M)``,
        with ``cols`` the input rows of the ``M`` samples ``m``, ``(M S, C_in)``."""
        s, b, upto = self.x.shape[2], hi - lo, out.shape[-1]
        rows = self.x[lo:hi].to(cols.dtype).transpose(1, 2).reshape(-1, self.x.shape[1])
        # (n, position, position', m): the sample m innermost, so that every offset's
        # window below adds contiguous runs
        channel = (rows @ cols.T).view(b, s, upto, s).permute(0, 1, 3, 2)
        channel = F.pad(channel, (0, 0, 0, 1, 0, 1))  # position s: the grid's zeros
        grid = channel.index_select(1, self.grid).index_select(2, self.grid)
        grid = grid.view(b, *self.padded, *self.padded, upto)
        windows = out.view(b, *self.out, *self.out, upto).zero_()
        for offset in itertools.product(*map(range, self.geo.kernel)):
            window = tuple(
                slice(k * d, k * d + st * (o - 1) + 1, st)
                for k, d, st, o in zip(offset, self.geo.dilation, self.geo.stride, self.out)
            )
            windows.add_(grid[(slice(None), *window, *window)])
        if self.bias:
            windows.add_(1.0)


def conv_output_rows(g: Tensor) -> Tensor:
    """Output-shaped ``(B, N, C_out, *spatial)`` -> ``(B, N, T, C_out)``."""
    return g.flatten(3).transpose(-1, -2)


class ConvMatrix(Layout):
    """``W̄`` ``(C_out, C_in/G·∏k)`` (plus a bias column) of a conv or transposed conv
    module, all groups stacked (group ``g`` owns rows ``g·C_out/G ...``), mapped to the
    module's flat layout (weight row-major, then the bias)."""

    def __init__(self, module: nn.Module, has_bias: bool):
        self.name, self.offset = "", 0
        w = module.weight
        self.transposed, self.groups = module.transposed, module.groups
        self.kernel = tuple(w.shape[2:])
        if self.transposed:
            self.c_in_g, self.c_out_g = w.shape[0] // self.groups, w.shape[1]
        else:
            self.c_in_g, self.c_out_g = w.shape[1], w.shape[0] // self.groups
        self._has_bias = has_bias

    @property
    def d_in(self) -> int:
        return self.c_in_g * math.prod(self.kernel)

    @property
    def d_out(self) -> int:
        return self.c_out_g * self.groups

    @property
    def has_bias(self) -> bool:
        return self._has_bias

    def to_matrix(self, flat: Tensor) -> Tensor:
        if not self.transposed:
            return super().to_matrix(flat)
        lead, nd = flat.shape[:-1], len(self.kernel)
        n_w = self.d_out * self.d_in
        w = flat[..., :n_w].reshape(*lead, self.groups, self.c_in_g, self.c_out_g, *self.kernel)
        w = w.flip(list(range(-nd, 0))).transpose(-nd - 1, -nd - 2)
        w = w.reshape(*lead, self.d_out, self.d_in)
        if not self.has_bias:
            return w
        return torch.cat([w, flat[..., n_w:].unsqueeze(-1)], dim=-1)

    def to_flat(self, mat: Tensor) -> Tensor:
        if not self.transposed:
            return super().to_flat(mat)
        lead, nd = mat.shape[:-2], len(self.kernel)
        w = mat[..., : self.d_in].reshape(
            *lead, self.groups, self.c_out_g, self.c_in_g, *self.kernel
        )
        w = w.transpose(-nd - 1, -nd - 2).flip(list(range(-nd, 0))).reshape(*lead, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, mat[..., self.d_in]], dim=-1)


class ConvKind(MatrixKind):
    """``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with ``groups=1``: ``W̄``
    ``(C_out, C_in·∏k)`` on unfolded patches of the padded (transposed: dilated and
    padded) input, the output locations are ``T``; Kronecker factors as KFC."""

    convolutional = True

    def __init__(self, name: str, module: nn.Module, offset: int):
        super().__init__(name, module, offset)
        self.geometry = ConvGeometry.of(module)
        self.matrix = ConvMatrix(module, self.has_bias)

    @property
    def d_in(self) -> int:
        return self.matrix.d_in

    @property
    def d_out(self) -> int:
        return self.matrix.d_out

    def to_matrix(self, flat: Tensor) -> Tensor:
        return self.matrix.to_matrix(flat)

    def to_flat(self, mat: Tensor) -> Tensor:
        return self.matrix.to_flat(mat)

    def weight_product(self, rows: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        if not self.geometry.transposed:
            return super().weight_product(rows, a, out)
        mat = long_tmm(rows.reshape(-1, self.d_out), a.reshape(-1, self.d_in_h))
        flat = self.to_flat(mat)
        return flat if out is None else out.copy_(flat)

    def unfold(self, x: Tensor) -> Tensor:
        """``(N, C_in, *spatial)`` -> patch rows ``(N, T, C_in·∏k)`` in ``(C_in, *kernel)``
        order, with a trailing 1 for a bias."""
        return conv_patches(x, self.geometry, self.has_bias).squeeze(2)

    def output_rows(self, g: Tensor) -> Tensor:
        return conv_output_rows(g)

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return tuple(out.shape[2:])

    def location_products(self, calls: Sequence[ModuleCall]) -> InputProducts | None:
        """:class:`InputProducts` of a single call where they cost fewer multiply-adds
        than the patches' own products (stride-1 convolutions), else ``None``."""
        if len(calls) != 1:
            return None
        x, out = calls[0].x, calls[0].out
        products = InputProducts.of(x, self.geometry, self.has_bias)
        n, t = x.shape[0], math.prod(out.shape[2:])
        return products if products.cost(n) < (n * t) ** 2 * self.d_in_h else None


class GroupedConvKind(PerSampleKind):
    """A conv or transposed conv with ``groups > 1`` (depthwise included).

    The exact objects read it through its per-sample gradients ``⊕_g Σ_t e_nctg ā_ntgᵀ``
    (formed by one ``einsum`` from the unfolded input and the output-gradients, within
    the memory budget); the Kronecker methods use the groups' rows
    (:meth:`read_grouped`, :attr:`group_layouts`), one factor pair per group.
    """

    def __init__(self, name: str, module: nn.Module, offset: int):
        super().__init__(name, module, offset)
        self.geometry = ConvGeometry.of(module)
        bias = module.bias is not None and module.bias.requires_grad
        self.matrix = ConvMatrix(module, bias)

    @property
    def group_layouts(self) -> list[BlockLayout]:
        m = self.matrix
        return [
            BlockLayout(f"{self.name}[group {g}]", m.c_out_g, m.d_in, m.has_bias, True)
            for g in range(m.groups)
        ]

    def group_order(self) -> Tensor:
        """Positions of this layer's slice in the order of the groups' slices."""
        positions = torch.arange(self.num_params, dtype=torch.float64)
        mat = self.matrix.to_matrix(positions).unflatten(0, (self.matrix.groups, -1))
        return torch.cat([lay.to_flat(part) for lay, part in zip(self.group_layouts, mat)]).long()

    def grouped_rows(self, x: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """``ā`` ``(N, T, G, d_in_h)`` and output rows ``(B, N, T, G, C_out/G)``."""
        a = conv_patches(x, self.geometry, self.matrix.has_bias)
        rows = conv_output_rows(grads).unflatten(-1, (self.matrix.groups, -1))
        return a, rows

    def gradients_from_groups(self, a: Tensor, rows: Tensor) -> Tensor:
        """``(B, N, num_params)``: ``⊕_g Σ_t rows_btg ā_tgᵀ`` in flat-layout order."""
        mats = torch.einsum("bntgo,ntgi->bngoi", rows, a)
        return self.matrix.to_flat(mats.flatten(2, 3))

    def per_sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        return self.gradients_from_groups(*self.grouped_rows(x, grads))

    def read_grouped(
        self, x: Tensor, out: Tensor, grads: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        self.check_budget(*grads.shape[:2], grads.element_size())
        a, rows = self.grouped_rows(x, grads)
        return *self.as_rows(self.gradients_from_groups(a, rows)), (a, rows)

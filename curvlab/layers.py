"""Supported layers: discovery, input unfolding and the per-layer parameter layout.

Every supported layer is treated as a matrix layer ``W̄ = [W | b]`` of shape
``d_out x d_in_h`` acting on homogeneous inputs ``ā = [a, 1]`` (the 1 only when
the layer has a trainable bias; ``d_in_h = d_in + has_bias``).  Conv weights
``(C_out, C_in, *k)`` are the matrix ``(C_out, C_in·∏k)`` that multiplies
unfolded patches, so a layer's parameters always read as one ``d_out x d_in_h``
matrix.  The flat vector layout (DESIGN.md) is the weight flattened row-major
followed by the bias; :meth:`LayerInfo.to_matrix` / :meth:`LayerInfo.to_flat`
convert between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.errors import UnsupportedModelError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerInfo:
    """Static description of one supported layer.

    Attributes:
        name: The module's name in ``model.named_modules()``.
        module: The module itself.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        has_bias: Whether a trainable bias is part of the layer's parameters.
        d_in: Input features (``C_in·∏kernel`` for conv), without the homogeneous 1.
        d_out: Output features (``C_out`` for conv).
        offset: Start of this layer's slice in the flat parameter vector.
    """

    name: str
    module: nn.Module
    kind: str
    has_bias: bool
    d_in: int
    d_out: int
    offset: int

    @property
    def d_in_h(self) -> int:
        """Columns of ``[W | b]``: ``d_in`` plus one for a trainable bias."""
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """Number of entries of this layer in the flat vector."""
        return self.d_out * self.d_in_h

    @property
    def slice(self) -> slice:
        """This layer's slice of the flat parameter vector."""
        return slice(self.offset, self.offset + self.num_params)

    @property
    def params(self) -> list[nn.Parameter]:
        """The layer's trainable parameters in flat-layout order (weight, then bias)."""
        out = [self.module.weight]
        if self.has_bias:
            out.append(self.module.bias)
        return out

    def to_matrix(self, flat: Tensor) -> Tensor:
        """Flat slice ``(..., num_params)`` -> ``[W | b]`` of shape ``(..., d_out, d_in_h)``."""
        lead = flat.shape[:-1]
        n_w = self.d_out * self.d_in
        w = flat[..., :n_w].reshape(*lead, self.d_out, self.d_in)
        if not self.has_bias:
            return w
        return torch.cat([w, flat[..., n_w:].unsqueeze(-1)], dim=-1)

    def to_flat(self, mat: Tensor) -> Tensor:
        """``[W | b]`` of shape ``(..., d_out, d_in_h)`` -> flat slice ``(..., num_params)``."""
        lead = mat.shape[:-2]
        w = mat[..., : self.d_in].reshape(*lead, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, mat[..., self.d_in]], dim=-1)

    def weight_product(self, rows: Tensor, a: Tensor, out: Tensor | None = None) -> Tensor:
        """``Σ_nt rows_nt ā_ntᵀ`` as this layer's flat slice ``(num_params,)``.

        With ``rows`` the output gradients this is the layer's gradient.  One matrix
        product (the bias part as a row sum), written straight into the flat layout.

        Args:
            rows: Output rows ``(N, T, d_out)``.
            a: Homogeneous inputs ``(N, T, d_in_h)`` (:meth:`unfold`).
            out: Optional destination ``(num_params,)``, e.g. a slice of a flat vector.
        """
        if out is None:
            out = rows.new_empty(self.num_params)
        r = rows.reshape(-1, self.d_out)
        x = a.reshape(-1, self.d_in_h)
        n_w = self.d_out * self.d_in
        torch.mm(r.T, x[:, : self.d_in], out=out[:n_w].view(self.d_out, self.d_in))
        if self.has_bias:
            torch.sum(r, dim=0, out=out[n_w:])
        return out

    def flat_index(self) -> Tensor:
        """Index ``p`` with ``flat[p] == [W | b].flatten()`` (row-major), for dense blocks."""
        positions = torch.arange(self.num_params, dtype=torch.float64)
        return self.to_matrix(positions).reshape(-1).long()

    def unfold(self, x: Tensor) -> Tensor:
        """Layer input -> ``(N, T, d_in_h)`` rows that ``[W | b]`` multiplies.

        Linear: ``(N, ..., d_in)`` -> ``T = ∏(...)`` (1 for 2-D inputs).
        Conv: patches in PyTorch's ``(C_in, *kernel)`` order, ``T`` = output locations.
        """
        if self.kind != "linear":
            return _unfold_conv(x, self.module, self.has_bias)
        a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def output_rows(self, g: Tensor) -> Tensor:
        """Output-shaped tensor ``(B, N, *out)`` -> ``(B, N, T, d_out)`` matching :meth:`unfold`."""
        if self.kind == "linear":
            return g.reshape(*g.shape[:2], -1, g.shape[-1])
        return g.flatten(3).transpose(-1, -2) if g.dim() == 5 else g.transpose(-1, -2)


def _unfold_conv(x: Tensor, m: nn.Conv1d | nn.Conv2d, bias: bool) -> Tensor:
    """Unfold a conv input ``(N, C_in, *spatial)`` into patch rows ``(N, T, C_in·∏k)``,
    columns in PyTorch's ``(C_in, *kernel)`` order, with a trailing 1 when ``bias``.

    The patches are a strided window view of the zero-padded input, copied once into
    the output (no intermediate ``im2col`` buffer and no second copy for the bias column).
    """
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        padding = m.padding if isinstance(m.padding, str) else (0, *m.padding)
    else:
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        padding = m.padding
    if padding == "same":
        pads: list[int] = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    elif padding == "valid":
        pads = [0, 0, 0, 0]
    else:
        pads = [p for p in reversed(padding) for _ in range(2)]
    if any(pads):
        x = F.pad(x, pads)
    windows = x
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation), start=2):
        windows = windows.unfold(dim, d * (k - 1) + 1, s)
    windows = windows[..., :: dilation[0], :: dilation[1]]  # (N, C_in, H_out, W_out, kh, kw)
    n, c_in, h_out, w_out = windows.shape[:4]
    d_in = c_in * kernel[0] * kernel[1]
    out = x.new_empty(n, h_out * w_out, d_in + int(bias))
    patches = out[..., :d_in].unflatten(1, (h_out, w_out)).unflatten(-1, (c_in, *kernel))
    patches.copy_(windows.permute(0, 2, 3, 1, 4, 5))
    if bias:
        out[..., d_in] = 1
    return out


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """The supported layers of ``model`` with trainable weights, in flat-layout order.

    Raises:
        UnsupportedModelError: a module with trainable parameters that is not
            supported (named with its type), a conv with ``groups != 1`` or a
            non-zero padding mode, a trainable bias on a frozen weight, or
            parameters shared between modules.
    """
    layers: list[LayerInfo] = []
    offset = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"module '{name or '<root>'}' ({type(module).__name__})"
        if not isinstance(module, SUPPORTED):
            raise UnsupportedModelError(
                f"{label} has trainable parameters but curvlab supports only "
                "nn.Linear, nn.Conv1d and nn.Conv2d. Freeze it "
                "(p.requires_grad_(False) for its parameters) or remove it."
            )
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            if module.groups != 1:
                raise UnsupportedModelError(
                    f"{label} has groups={module.groups}; only groups=1 convolutions are "
                    "supported. Freeze the layer or use groups=1."
                )
            if module.padding_mode != "zeros":
                raise UnsupportedModelError(
                    f"{label} uses padding_mode='{module.padding_mode}'; only 'zeros' is "
                    "supported. Freeze the layer or pad explicitly before it."
                )
        if not module.weight.requires_grad:
            raise UnsupportedModelError(
                f"{label} has a frozen weight but a trainable bias; freeze both or neither."
            )
        for p in own:
            if id(p) in seen:
                raise UnsupportedModelError(
                    f"{label} shares a parameter with another module; tied weights are "
                    "not supported."
                )
            seen.add(id(p))
        has_bias = module.bias is not None and module.bias.requires_grad
        d_out = module.weight.shape[0]
        d_in = module.weight[0].numel()
        kind = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}[type(module)]
        info = LayerInfo(name, module, kind, has_bias, d_in, d_out, offset)
        layers.append(info)
        offset += info.num_params
    if not layers:
        raise UnsupportedModelError(
            "the model has no trainable nn.Linear/nn.Conv1d/nn.Conv2d layer to analyse."
        )
    _check_parameter_order(model, layers)
    return layers


def _check_parameter_order(model: nn.Module, layers: list[LayerInfo]) -> None:
    """Ensure the layer-wise layout equals ``model.parameters()`` order (DESIGN.md)."""
    ours = [id(p) for info in layers for p in info.params]
    theirs = [id(p) for p in model.parameters() if p.requires_grad]
    if ours != theirs:
        raise UnsupportedModelError(
            "the model registers its trainable parameters in an order that does not follow "
            "its modules (weight then bias per layer); curvlab's flat vector layout would "
            "not match model.parameters(). Register parameters through nn.Linear/nn.Conv "
            "submodules."
        )

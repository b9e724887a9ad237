"""``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding: ``W̄`` is the weight
``(C_out, C_in·∏k)`` (plus a bias column) multiplying unfolded patches; the output
locations are ``T``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvlab.layers.base import MatrixKind


class ConvKind(MatrixKind):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and ``padding_mode='zeros'``."""

    convolutional = True

    def unfold(self, x: Tensor) -> Tensor:
        """``(N, C_in, *spatial)`` -> patch rows ``(N, T, C_in·∏k)`` in PyTorch's
        ``(C_in, *kernel)`` order, with a trailing 1 for a bias."""
        return unfold_conv(x, self.module, self.has_bias)

    def output_rows(self, g: Tensor) -> Tensor:
        return g.flatten(3).transpose(-1, -2) if g.dim() == 5 else g.transpose(-1, -2)

    def locations(self, out: Tensor) -> tuple[int, ...]:
        return tuple(out.shape[2:])


def unfold_conv(x: Tensor, m: nn.Conv1d | nn.Conv2d, bias: bool) -> Tensor:
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

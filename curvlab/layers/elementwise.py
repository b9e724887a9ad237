"""Layers with elementwise (per-feature) parameters, read through per-sample gradients.

For ``y = w ∘ x̂ + b`` (``x̂`` the normalised input, the weight broadcast over the
positions that share it) the per-(sample, column) gradients are

    ∂/∂w: Σ_pos e_nc ∘ x̂_n,      ∂/∂b: Σ_pos e_nc,

with ``e_nc`` the backpropagated output-gradient of column ``c``; PReLU's weight has
``min(x, 0)`` in place of ``x̂``.  ``x̂`` is recomputed from the captured input exactly
as the module computed it (BatchNorm: running statistics in eval mode, batch statistics
otherwise).  These layers are small, so the approximations use their exact block.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from curvlab.layers.base import PerSampleKind


def _sum_except(t: Tensor, keep: tuple[int, ...]) -> Tensor:
    """Sum ``t`` over every dimension not in ``keep`` (dimensions kept in order)."""
    drop = [d for d in range(t.dim()) if d not in keep]
    return t.sum(dim=drop) if drop else t


class AffineKind(PerSampleKind):
    """``y = w ∘ x̂ + b`` with ``w``, ``b`` shared over all but some feature dimensions."""

    @abstractmethod
    def normalised(self, x: Tensor) -> Tensor:
        """``x̂``: what the weight multiplies, shaped like the output ``(N, ...)``."""

    @abstractmethod
    def feature_dims(self, out: Tensor) -> tuple[int, ...]:
        """Dimensions of the output ``(N, ...)`` that index the parameters (the rest
        are summed over)."""

    def per_sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        keep = (0, 1, *(d + 1 for d in self.feature_dims(out)))
        pieces = []
        for name, p in self.module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            prod = grads * self.normalised(x) if name == "weight" else grads
            pieces.append(_sum_except(prod, keep).reshape(*grads.shape[:2], p.numel()))
        return torch.cat(pieces, dim=-1)


class BatchNormKind(AffineKind):
    """``nn.BatchNorm1d/2d/3d`` affine weight and bias; channels are dimension 1."""

    def normalised(self, x: Tensor) -> Tensor:
        m = self.module
        batch_stats = m.training or m.running_mean is None
        if batch_stats:
            return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def feature_dims(self, out: Tensor) -> tuple[int, ...]:
        return (1,)


class GroupNormKind(AffineKind):
    """``nn.GroupNorm`` per-channel weight and bias; channels are dimension 1."""

    def normalised(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)

    def feature_dims(self, out: Tensor) -> tuple[int, ...]:
        return (1,)


class LayerNormKind(AffineKind):
    """``nn.LayerNorm`` weight and bias over the trailing ``normalized_shape``."""

    def normalised(self, x: Tensor) -> Tensor:
        m = self.module
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def feature_dims(self, out: Tensor) -> tuple[int, ...]:
        k = len(self.module.normalized_shape)
        return tuple(range(out.dim() - k, out.dim()))


class RMSNormKind(LayerNormKind):
    """``nn.RMSNorm`` weight over the trailing ``normalized_shape``."""

    def normalised(self, x: Tensor) -> Tensor:
        m = self.module
        return F.rms_norm(x, m.normalized_shape, None, m.eps)


class PReLUKind(AffineKind):
    """``nn.PReLU``: ``y = max(x, 0) + w ∘ min(x, 0)``, one weight or one per channel
    (dimension 1)."""

    def normalised(self, x: Tensor) -> Tensor:
        return x.clamp(max=0)

    def feature_dims(self, out: Tensor) -> tuple[int, ...]:
        return () if self.module.num_parameters == 1 else (1,)

"""The fallback kind: any module with trainable parameters, through ``torch.func``.

The per-(sample, column) gradients of the module's own parameters are the vector-Jacobian
products of its forward at each captured input sample with that sample's output
gradients (``vmap`` over the samples and the columns of ``vjp`` of
``torch.func.functional_call``).  This is exact for any module whose output for one
sample depends only on that sample's input; the single-sample outputs are compared with
the captured batch output, and a module that couples samples (batch statistics, dropout
in ``train()`` mode) is refused.  Parametrised modules (``torch.nn.utils.parametrize``,
``weight_norm``, ``spectral_norm``) take this path with the tensors that are actually
trained (e.g. ``parametrizations.weight.original``), never their derived ``weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize

from curvlab.errors import UnsupportedModelError
from curvlab.layers.base import PerSampleKind


class GenericKind(PerSampleKind):
    """Any module: its own trainable parameters (and those of its parametrizations)."""

    # the vmapped vjp keeps about one more result-sized buffer besides its result
    memory_factor = 2
    # the single-sample outputs are compared with the captured batch output
    reads_output = True

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """``(name relative to the module, parameter)`` in flat-layout order."""
        return [
            (name, p)
            for name, p in self.module.named_parameters()
            if p.requires_grad and ("." not in name or _in_parametrizations(self.module, name))
        ]

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params]

    def per_sample_gradients(self, x: Tensor, out: Tensor, grads: Tensor) -> Tensor:
        names = [name for name, _ in self.named_params]
        values = tuple(p.detach() for _, p in self.named_params)
        module = self.module

        def forward(xn: Tensor, *vals: Tensor) -> Tensor:
            return functional_call(module, dict(zip(names, vals)), (xn.unsqueeze(0),))[0]

        def one(xn: Tensor, en: Tensor) -> tuple[Tensor, Tensor]:
            prim, pull = vjp(lambda *vals: forward(xn, *vals), *values)
            parts = vmap(pull)(en)
            return prim, torch.cat([g.reshape(g.shape[0], -1) for g in parts], dim=-1)

        try:
            # torch.func differentiates under no_grad; no graph is kept over other modules
            with torch.no_grad():
                prims, psg = vmap(one, in_dims=(0, 1), randomness="different")(x, grads)
        except (RuntimeError, NotImplementedError) as err:
            raise UnsupportedModelError(
                f"module '{self.name}' ({type(module).__name__}) has trainable parameters "
                f"but its per-sample gradients could not be formed with torch.func ({err}). "
                "Freeze it."
            ) from err
        self._check_independent(prims, out.detach())
        return psg.transpose(0, 1)

    def _check_independent(self, single: Tensor, batch: Tensor) -> None:
        """Refuse a module whose single-sample outputs differ from its batch output."""
        tol = torch.finfo(batch.dtype).eps ** 0.5 * batch.abs().max().clamp_min(1.0)
        if single.shape != batch.shape or (single - batch).abs().max() > tol:
            raise UnsupportedModelError(
                f"module '{self.name}' ({type(self.module).__name__}) gives different "
                "outputs for a sample alone and within the batch: it couples samples (batch "
                "statistics, dropout or other randomness in train() mode), so its "
                "per-sample gradients are not defined. Call model.eval() or freeze it."
            )


def _in_parametrizations(module: nn.Module, name: str) -> bool:
    return parametrize.is_parametrized(module) and name.startswith("parametrizations.")

"""``nn.MultiheadAttention``: all its trainable tensors, through exact per-sample gradients.

The module computes with its parameters inside ``F.multi_head_attention_forward``
(input projections ``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ from ``embed_dim``; ``bias_k``/``bias_v``; the output projection
``out_proj``, used functionally, never called as a module), so this kind owns all of them
as one layer, in ``model.parameters()`` order: the module's own parameters, then
``out_proj.weight`` and ``out_proj.bias``.

One call is read as the user made it: ``query``, ``key`` and ``value`` (self-attention
when they are one tensor, cross-attention otherwise), ``key_padding_mask`` (per sample),
``attn_mask`` (``(L, S)`` shared by the batch, or ``(N·heads, L, S)`` per sample),
``is_causal``, ``need_weights``, ``average_attn_weights``; the batch is dimension 0 with
``batch_first=True`` and dimension 1 otherwise.  The capture takes the output-gradient of
``attn_output`` only; attention weights that reach the loss are refused by the capture's
parameter-use check.  The per-(sample, column) gradients are the vector-Jacobian products
of the module's own forward on each sample alone (its inputs and masks sliced to that
sample, the fused inference path off) with that sample's output-gradients
(``torch.func``: ``vmap`` over the samples and the columns of ``vjp``).  The batched
forward may run any attention kernel (flash, memory-efficient, math); the per-sample
recomputation may run another one, so its outputs are checked against the batch output
(as for :class:`~curvlab.layers.generic.GenericKind`).  Attention dropout in ``train()``
mode is refused: every recomputation would draw other masks.  The approximations use the
layer's exact block (``kronecker = False``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.errors import UnsupportedModelError
from curvlab.layers.generic import GenericKind

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class AttentionCall:
    """What the capture keeps of one call of ``nn.MultiheadAttention``.

    Attributes:
        inputs: The distinct tensors among ``query``, ``key``, ``value`` (detached, the
            batch at the module's batch dimension).
        which: Index into ``inputs`` of ``query``, ``key`` and ``value`` (``(0, 0, 0)``
            for self-attention).
        key_padding_mask: ``(N, S)`` or ``None``.
        attn_mask: ``(L, S)``, ``(N·heads, L, S)`` or ``None``.
        options: ``need_weights``, ``average_attn_weights`` and ``is_causal`` as passed.
    """

    inputs: tuple[Tensor, ...]
    which: tuple[int, int, int]
    key_padding_mask: Tensor | None
    attn_mask: Tensor | None
    options: dict[str, Any]


class AttentionKind(GenericKind):
    """``nn.MultiheadAttention``: in/out projections, ``bias_k``/``bias_v``, one block."""

    owns_submodules = True

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]

    @property
    def batch_dim(self) -> int:
        return 0 if self.module.batch_first else 1

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = _SIGNATURE.bind(self.module, *args, **kwargs)
        except TypeError as err:
            raise UnsupportedModelError(f"module '{self.name}' was called wrongly: {err}") from err
        bound.apply_defaults()
        return dict(bound.arguments)

    def inputs(self, args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
        call = self._bind(args, kwargs)
        return tuple(call[k] for k in ("query", "key", "value"))

    def record(self, args: tuple, kwargs: dict) -> AttentionCall:
        call = self._bind(args, kwargs)
        label = f"module '{self.name}' (MultiheadAttention)"
        if self.module.training and self.module.dropout > 0:
            raise UnsupportedModelError(
                f"{label} drops attention weights at random (dropout={self.module.dropout} "
                "in train() mode), so its per-sample gradients are not defined. Call "
                "model.eval() or build it with dropout=0."
            )
        if call["query"].dim() != 3:
            raise UnsupportedModelError(
                f"{label} received unbatched inputs (query of shape "
                f"{tuple(call['query'].shape)}); give it batched inputs."
            )
        masks = {k: call[k] for k in ("key_padding_mask", "attn_mask")}
        for k, m in masks.items():
            if m is not None and m.requires_grad:
                raise UnsupportedModelError(
                    f"{label} received a {k} that requires grad; curvlab reads masks as "
                    "constants: detach it."
                )
        distinct: list[Tensor] = []
        which = []
        for k in ("query", "key", "value"):
            x = call[k]
            i = next((j for j, y in enumerate(distinct) if y is x), len(distinct))
            if i == len(distinct):
                distinct.append(x)
            which.append(i)
        options = {k: call[k] for k in ("need_weights", "average_attn_weights", "is_causal")}
        return AttentionCall(
            inputs=tuple(x.detach() for x in distinct),
            which=(which[0], which[1], which[2]),
            key_padding_mask=masks["key_padding_mask"],
            attn_mask=masks["attn_mask"],
            options=options,
        )

    def output(self, out: object) -> Tensor:
        return out[0]

    def with_output(self, out: object, tensor: Tensor) -> object:
        return (tensor, *out[1:])

    def per_sample_gradients(self, x: AttentionCall, out: Tensor, grads: Tensor) -> Tensor:
        """``(B, N, num_params)`` from the call ``x``, ``attn_output`` ``out`` and its
        output-gradients ``grads`` ``(B, *out.shape)`` (batch at :attr:`batch_dim`)."""
        d, module = self.batch_dim, self.module
        names = [name for name, _ in self.named_params]
        values = tuple(p.detach() for _, p in self.named_params)
        kpm, mask = x.key_padding_mask, x.attn_mask
        per_sample_mask = mask is not None and mask.dim() == 3
        if per_sample_mask:  # (N·heads, L, S) -> (N, heads, L, S)
            mask = mask.reshape(-1, module.num_heads, *mask.shape[1:])

        def forward(xs: tuple[Tensor, ...], kpm_n: Tensor | None, mask_n: Tensor | None, vals):
            batched = [t.unsqueeze(d) for t in xs]  # one sample, identities kept
            query, key, value = (batched[i] for i in x.which)
            kwargs = dict(x.options, attn_mask=mask_n)
            kwargs["key_padding_mask"] = None if kpm_n is None else kpm_n.unsqueeze(0)
            params = dict(zip(names, vals))
            return functional_call(module, params, (query, key, value), kwargs)[0].squeeze(d)

        def one(xs, kpm_n, mask_n, en: Tensor) -> tuple[Tensor, Tensor]:
            prim, pull = vjp(lambda *vals: forward(xs, kpm_n, mask_n, vals), *values)
            parts = vmap(pull)(en)
            return prim, torch.cat([g.reshape(g.shape[0], -1) for g in parts], dim=-1)

        in_dims = (d, None if kpm is None else 0, 0 if per_sample_mask else None, 1)
        rows = grads.movedim(1 + d, 1)  # (B, N, *out per sample)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                prims, psg = vmap(one, in_dims=in_dims)(x.inputs, kpm, mask, rows)
        except (RuntimeError, NotImplementedError) as err:
            raise UnsupportedModelError(
                f"module '{self.name}' (MultiheadAttention): its per-sample gradients could "
                f"not be formed with torch.func ({err}). Freeze it."
            ) from err
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        self._check_independent(prims, out.detach().movedim(d, 0))
        return psg.transpose(0, 1)

"""``nn.MultiheadAttention``: its trainable tensors, as Kronecker layers or one exact block.

The module computes with its parameters inside ``F.multi_head_attention_forward``
(input projections ``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ from ``embed_dim``; ``bias_k``/``bias_v``; the output projection
``out_proj``, used functionally, never called as a module), so its kinds read them from
the module's call, in ``model.parameters()`` order (the module's own tensors, then
``out_proj.weight`` and ``out_proj.bias``):

* **packed** (one ``in_proj_weight``, no trainable ``bias_k``/``bias_v``): two Kronecker
  layers.  :class:`InProjectionKind` ``[in_proj_weight | in_proj_bias]`` ``(3E, E + 1)``
  has as rows the inputs at the positions of each distinct input tensor (``L`` for
  self-attention) and as output rows the gradients of the projected queries, keys and
  values there (zero in the other inputs' parts), from one batched ``vjp`` through the
  attention with identity projections.  :class:`OutProjectionKind` (named
  ``<module>.out_proj``) ``[W | b]`` ``(E, E + 1)`` has as rows the attention's context
  (recomputed with an identity ``out_proj``) and as output rows the output-gradients of
  ``attn_output``.  Both give the exact Gram and KFAC/EKFAC/FOOF factors, equal to those
  of the same attention written from ``nn.Linear`` layers.
* **otherwise** :class:`AttentionKind`: the whole module as one layer, read through its
  exact per-(sample, column) gradients: the vector-Jacobian products of the module's own
  forward on each sample alone (its inputs and masks sliced to that sample) with that
  sample's output-gradients (``torch.func``: ``vmap`` over the samples and the columns of
  ``vjp``), its single-sample outputs checked against the batch output as for
  :class:`~curvlab.layers.generic.GenericKind`; the approximations use its exact block.

One call is read as the user made it: ``query``, ``key`` and ``value`` (self-attention
when they are one tensor, cross-attention otherwise), ``key_padding_mask`` (per sample),
``attn_mask`` (``(L, S)`` shared by the batch, or ``(N·heads, L, S)`` per sample),
``is_causal``, ``need_weights``, ``average_attn_weights``; the batch is dimension 0 with
``batch_first=True`` and dimension 1 otherwise.  The capture takes the output-gradient of
``attn_output`` only; attention weights that reach the loss are refused by the capture's
parameter-use check.  The batched forward may run any attention kernel (flash,
memory-efficient, math); the recomputations run without the fused inference path, the
differentiated ones on the math kernel.  Attention dropout in ``train()`` mode is
refused: every recomputation would draw other masks.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab.errors import UnsupportedModelError
from curvlab.layers.base import LayerKind, ModuleKind
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


def _trained(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


class _Unhooked(nn.Module):
    """Runs ``inner``'s own forward without its hooks (those act on the recorded call's
    output downstream of the module); its tensors are named ``inner.<name>``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)


class _AttentionCallReader:
    """How kinds of ``nn.MultiheadAttention`` read its call (module docstring)."""

    name: str
    module: nn.MultiheadAttention

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
                "in train() mode), so what the capture recomputes from the call would "
                "differ from the forward pass. Call model.eval() or build it with dropout=0."
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

    def _call(self, x: AttentionCall, params: dict[str, Tensor]) -> Tensor:
        """The module's ``attn_output`` for the recorded call ``x`` with some of its
        tensors replaced by ``params`` (no autograd, the fused inference path off)."""
        query, key, value = (x.inputs[i] for i in x.which)
        kwargs = dict(x.options, key_padding_mask=x.key_padding_mask, attn_mask=x.attn_mask)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                params = {f"inner.{k}": v for k, v in params.items()}
                module = _Unhooked(self.module)
                return functional_call(module, params, (query, key, value), kwargs)[0]
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    @classmethod
    def layers(cls, name: str, module: nn.Module, offset: int) -> list[LayerKind]:
        """The in-projection and ``out_proj`` as Kronecker layers when the module packs
        its input projections and trains no ``bias_k``/``bias_v`` (and trains each bias
        only with its weight); else the whole module as one exact :class:`AttentionKind`."""
        m = module
        packed = m._qkv_same_embed_dim and not (_trained(m.bias_k) or _trained(m.bias_v))
        for w, b in ((m.in_proj_weight, m.in_proj_bias), (m.out_proj.weight, m.out_proj.bias)):
            packed = packed and (_trained(w) or not _trained(b))
        if not packed:
            return [AttentionKind(name, module, offset)]
        out: list[LayerKind] = []
        for kind in (InProjectionKind, OutProjectionKind):
            info = kind(name, module, offset)
            if info.params:
                out.append(info)
                offset += info.num_params
        return out


class AttentionKind(_AttentionCallReader, GenericKind):
    """``nn.MultiheadAttention`` as one exact layer: all its trainable tensors."""

    owns_submodules = True

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]

    def per_sample_gradients(self, x: AttentionCall, out: Tensor, grads: Tensor) -> Tensor:
        """``(B, N, num_params)`` from the call ``x``, ``attn_output`` ``out`` and its
        output-gradients ``grads`` ``(B, *out.shape)`` (batch at :attr:`batch_dim`)."""
        d, module = self.batch_dim, _Unhooked(self.module)
        names = [f"inner.{name}" for name, _ in self.named_params]
        values = tuple(p.detach() for _, p in self.named_params)
        kpm, mask = x.key_padding_mask, x.attn_mask
        per_sample_mask = mask is not None and mask.dim() == 3
        if per_sample_mask:  # (N·heads, L, S) -> (N, heads, L, S)
            mask = mask.reshape(-1, self.module.num_heads, *mask.shape[1:])

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


class _ProjectionKind(_AttentionCallReader, ModuleKind):
    """A projection ``W̄ = [W | b]`` of ``nn.MultiheadAttention`` read from its call."""

    kronecker = True
    owns_submodules = True

    def __init__(self, name: str, module: nn.Module, offset: int):
        super().__init__(name, module, offset)
        self._rows: tuple[int, ...] = ()

    @property
    @abstractmethod
    def weight(self) -> Tensor:
        """The projection's weight ``(d_out, d_in)``."""

    @property
    @abstractmethod
    def bias(self) -> Tensor | None:
        """Its bias ``(d_out,)`` or ``None``."""

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    @property
    def has_bias(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    def locations(self, out: Tensor) -> tuple[int, ...]:
        """The rows' locations of the last :meth:`read` (``(T,)``)."""
        return self._rows

    def _homogeneous(self, a: Tensor) -> Tensor:
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        self._rows = (a.shape[1],)
        return a


class InProjectionKind(_ProjectionKind):
    """The packed input projection ``[in_proj_weight | in_proj_bias]`` ``(3E, E + 1)``.

    Its rows are the inputs at every position of each distinct input tensor (``L`` query
    positions for self-attention; ``L + S`` or ``L + 2S`` for cross-attention), and the
    output rows are the gradients of the projected queries, keys and values there
    (zero in the parts of the other inputs), from one batched ``vjp`` through the
    attention with identity projections.
    """

    owns_submodules = False  # out_proj is the next layer

    @property
    def weight(self) -> Tensor:
        return self.module.in_proj_weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.in_proj_bias

    def read(self, x: AttentionCall, out: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        m, d = self.module, self.batch_dim
        e = m.embed_dim
        w = m.in_proj_weight.detach().chunk(3)
        b = [None] * 3 if m.in_proj_bias is None else m.in_proj_bias.detach().chunk(3)
        seq = [t if d == 1 else t.transpose(0, 1) for t in x.inputs]  # (L_i, N, E)
        projected = tuple(F.linear(seq[i], w[j], b[j]) for j, i in enumerate(x.which))
        eye = torch.eye(e, dtype=out.dtype, device=out.device)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.multi_head_attention_forward(
                q,
                k,
                v,
                e,
                m.num_heads,
                None,
                None,
                m.bias_k,
                m.bias_v,
                m.add_zero_attn,
                0.0,
                m.out_proj.weight,
                m.out_proj.bias,
                training=False,
                key_padding_mask=x.key_padding_mask,
                attn_mask=x.attn_mask,
                use_separate_proj_weight=True,
                q_proj_weight=eye,
                k_proj_weight=eye,
                v_proj_weight=eye,
                **x.options,
            )[0]

        cot = grads if d == 1 else grads.transpose(1, 2)  # (B, L, N, E)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, pull = vjp(attend, *projected)
            parts = vmap(pull)(cot)  # three (B, L_i, N, E)
        parts = [g.transpose(1, 2) for g in parts]  # (B, N, L_i, E)
        rows, a = [], []
        for i, t in enumerate(seq):
            zero = parts[0].new_zeros(*parts[0].shape[:2], t.shape[0], e)
            rows.append(
                torch.cat([g if x.which[j] == i else zero for j, g in enumerate(parts)], -1)
            )
            a.append(t.transpose(0, 1))
        return self._homogeneous(torch.cat(a, dim=1)), torch.cat(rows, dim=2)


class OutProjectionKind(_ProjectionKind):
    """``out_proj`` ``[W | b]`` ``(E, E + 1)``: its rows are the attention's context at
    the ``L`` query positions (recomputed with an identity ``out_proj``), its output rows
    the output-gradients of ``attn_output``."""

    def __init__(self, name: str, module: nn.Module, offset: int):
        super().__init__(f"{name}.out_proj" if name else "out_proj", module, offset)

    @property
    def weight(self) -> Tensor:
        return self.module.out_proj.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.out_proj.bias

    def read(self, x: AttentionCall, out: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        e = self.module.embed_dim
        identity = {"out_proj.weight": torch.eye(e, dtype=out.dtype, device=out.device)}
        if self.bias is not None:
            identity["out_proj.bias"] = torch.zeros_like(self.bias)
        context = self._call(x, identity).movedim(self.batch_dim, 0)  # (N, L, E)
        return self._homogeneous(context), grads.movedim(1 + self.batch_dim, 1)

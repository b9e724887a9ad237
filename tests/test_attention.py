"""``nn.MultiheadAttention`` (curvlab.layers.attention) on complete tiny transformers.

Fixtures: self-attention language models (token Embedding, attention with a residual,
Linear MLP, Linear head) with batch_first True and False, a causal ``attn_mask`` and a
``key_padding_mask`` that differs per sample, attention weights requested or not, the
``is_causal`` hint; an ``nn.TransformerEncoderLayer``; cross-attention with separate
``kdim``/``vdim`` projections, ``bias_k``/``bias_v``, ``add_zero_attn`` and a per-sample
3-D float mask, with ``key is value`` and with three different inputs, and the same with
one packed in-projection (Kronecker layers).  Loss: token-level cross-entropy with
ignored targets.  References: dense float64 ``torch.func`` Jacobians
and loss Hessians of the whole batch (tests/sequence_reference.py), no curvlab code:
``grad``, ``to_dense``, ``mv``, ``solve``, ``natural_gradient``, ``trace``, relative
error ≤ RTOL = 1e-8; the exact GGN against curvlinops' ``GGNLinearOperator`` (math
attention kernel); KFAC (expand, reduce), EKFAC and FOOF of the packed projections
against the same attention written from ``nn.Linear`` layers.
"""

from __future__ import annotations

import pytest
import reference as R
import sequence_reference as S
import torch
from conftest import DAMPINGS, RTOL, mc_generator
from torch import Tensor, nn

import curvlab
from curvlab.errors import UnsupportedModelError
from curvlab.independence import random_modules
from curvlab.layers import find_layers
from curvlab.layers.attention import AttentionKind, InProjectionKind, OutProjectionKind

N, T, S_LEN, V, E, H = 3, 5, 4, 7, 8, 2
PAD = 0


def _causal(t: int) -> Tensor:
    return torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)


class SelfAttentionLM(nn.Module):
    """Tokens ``(N, T)`` -> logits ``(N, T, V)``: Embedding, self-attention (causal
    ``attn_mask``; ``key_padding_mask`` at the PAD tokens unless ``hint``, then the
    ``is_causal`` hint) with a residual, a Linear MLP and a Linear head."""

    def __init__(self, batch_first: bool, need_weights: bool = False, hint: bool = False):
        super().__init__()
        self.need_weights, self.hint = need_weights, hint
        self.tok = nn.Embedding(V, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(E, E), nn.Tanh())
        self.head = nn.Linear(E, V)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens)
        x = h if self.attn.batch_first else h.transpose(0, 1)
        kw = {"attn_mask": _causal(tokens.shape[1]), "need_weights": self.need_weights}
        if self.hint:
            kw["is_causal"] = True
        else:
            kw["key_padding_mask"] = tokens == PAD
        a, _ = self.attn(x, x, x, **kw)
        h = h + (a if self.attn.batch_first else a.transpose(0, 1))
        return self.head(self.mlp(h))


class EncoderLM(nn.Module):
    """Embedding, ``nn.TransformerEncoderLayer`` (causal, PAD keys masked), Linear head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, E)
        self.layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, V)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = _causal(tokens.shape[1])
        h = self.layer(self.tok(tokens), mask, tokens == PAD, is_causal=True)
        return self.head(h)


class CrossAttentionLM(nn.Module):
    """Tokens ``(N, T + S)``: the first ``T`` are queried, the last ``S`` are the source.

    Cross-attention with ``kdim = 6`` (source embedding) and ``vdim = 6`` (``key is
    value``) or ``vdim = 5`` (a Linear of the source: three different inputs), or with
    ``kdim = vdim = E`` (``packed``: one ``in_proj_weight``, frozen ``bias_k``/``bias_v``),
    ``bias_k``/``bias_v``, ``add_zero_attn``, and a per-sample float mask of shape
    ``(N·heads, T, S)`` made from the tokens; attention weights per head returned."""

    def __init__(self, batch_first: bool, shared_kv: bool, packed: bool = False):
        super().__init__()
        kdim = E if packed else 6
        vdim = kdim if shared_kv else (E if packed else 5)
        self.tok = nn.Embedding(V, E)
        self.src = nn.Embedding(V, kdim)
        self.val = None if shared_kv else nn.Linear(kdim, vdim)
        self.attn = nn.MultiheadAttention(
            E,
            H,
            kdim=kdim,
            vdim=vdim,
            add_bias_kv=True,
            add_zero_attn=True,
            batch_first=batch_first,
        )
        if packed:  # frozen bias_k/bias_v: the packed in-projection is a Kronecker layer
            self.attn.bias_k.requires_grad_(False)
            self.attn.bias_v.requires_grad_(False)
        self.head = nn.Linear(E, V)

    def forward(self, tokens: Tensor) -> Tensor:
        x, s = tokens[:, :T], tokens[:, T:]
        q, k = self.tok(x), self.src(s)
        v = k if self.val is None else self.val(k)
        dist = (x[:, :, None] - s[:, None, :]).abs().to(q.dtype)  # (N, T, S)
        mask = -0.3 * dist[:, None] * torch.arange(1, H + 1, dtype=q.dtype)[:, None, None]
        mask = mask.reshape(-1, T, S_LEN)  # (N·heads, T, S), per sample
        if not self.attn.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        a, _ = self.attn(q, k, v, attn_mask=mask, average_attn_weights=False)
        return self.head(q + a if self.attn.batch_first else (q + a).transpose(0, 1))


MODELS = {
    "self-batch-first": lambda: SelfAttentionLM(batch_first=True),
    "self-seq-first-weights": lambda: SelfAttentionLM(batch_first=False, need_weights=True),
    "self-causal-hint": lambda: SelfAttentionLM(batch_first=True, hint=True),
    "encoder-layer": EncoderLM,
    "cross-seq-first": lambda: CrossAttentionLM(batch_first=False, shared_kv=True),
    "cross-three-inputs": lambda: CrossAttentionLM(batch_first=True, shared_kv=False),
    "cross-packed-seq-first": lambda: CrossAttentionLM(False, shared_kv=True, packed=True),
    "cross-packed-three-inputs": lambda: CrossAttentionLM(True, shared_kv=False, packed=True),
}


def _build(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(1)
    model = MODELS[name]().double()
    with torch.no_grad():  # non-zero biases (PyTorch initialises them to zero)
        for n, p in model.named_parameters():
            if "bias" in n and "_k" not in n and "_v" not in n:
                p.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(3)
    width = T + S_LEN if name.startswith("cross") else T
    x = torch.randint(1, V, (N, width), generator=g)
    x[0, 3] = x[1, 2] = x[1, 4] = PAD  # padding differs per sample; first tokens never PAD
    y = torch.randint(0, V, (N, T), generator=g)
    y[1, 0] = y[2, 3] = -100
    return model, x, y


def _reference_gradient(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    params = list(R.trainable_params(model).values())
    return R.flatten(torch.autograd.grad(S.user_loss(loss_fn, model(x), y), params))


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_models_against_dense(name):
    """Exact GGN: every member of ExactFisher, natural_gradient, BlockDiagFisher."""
    model, x, y = _build(name)
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    kinds = {type(lc.info) for lc in capt.layers}
    assert kinds & {AttentionKind, InProjectionKind}
    assert capt.coupling is None
    g_ref = _reference_gradient(model, loss_fn, x, y)
    assert R.rel_err(capt.grad, g_ref) <= RTOL
    ref = S.dense_ggn(model, loss_fn, x, y)
    exact = curvlab.ExactFisher(capt)
    R.assert_close_all(R.interface_errors(exact, ref, DAMPINGS), RTOL, f"exact {name}")
    eye = torch.eye(ref.shape[0], dtype=torch.float64)
    ng = torch.linalg.solve(ref + 0.1 * eye, g_ref)
    assert R.rel_err(exact.natural_gradient(0.1), ng) <= RTOL
    blocks = torch.block_diag(*[ref[lc.info.slice, lc.info.slice] for lc in capt.layers])
    bd = curvlab.BlockDiagFisher(capt)
    R.assert_close_all(R.interface_errors(bd, blocks, DAMPINGS[1:]), RTOL, f"blockdiag {name}")


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_attention_other_fisher_types(fisher):
    model, x, y = _build("self-seq-first-weights")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    capt = curvlab.capture(model, loss_fn, x, y, fisher=fisher, generator=mc_generator(5))
    if fisher == "empirical":
        ref = S.dense_empirical(model, loss_fn, x, y)
    else:
        ref = S.dense_from_columns(model, x, capt.columns, capt.scale)
    R.assert_close_all(R.interface_errors(curvlab.ExactFisher(capt), ref, [0.1]), RTOL, fisher)


def test_attention_parameters_in_model_order():
    """The kind owns the module's own tensors, then ``out_proj``'s, as
    ``model.parameters()`` lists them."""
    model, _, _ = _build("cross-three-inputs")
    (info,) = [i for i in find_layers(model) if isinstance(i, AttentionKind)]
    names = [n for n, p in model.attn.named_parameters()]
    assert names == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
        "out_proj.weight",
        "out_proj.bias",
    ]
    assert [id(p) for p in info.params] == [id(p) for p in model.attn.parameters()]
    assert info.num_params == sum(p.numel() for p in model.attn.parameters())


def test_approximations_use_the_exact_attention_block():
    """KFAC, EKFAC, FOOF: attention with separate q/k/v projections and bias_k/bias_v
    has no Kronecker factors and gets its exact block; the other layers keep theirs."""
    model, x, y = _build("cross-three-inputs")
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    ref = S.dense_ggn(model, loss_fn, x, y)
    (attn,) = [lc for lc in capt.layers if isinstance(lc.info, AttentionKind)]
    s = attn.info.slice
    block = ref[s, s]
    v = R.random_vector(ref.shape[0])
    eye = torch.eye(block.shape[0], dtype=torch.float64)
    for cls in (curvlab.KFAC, curvlab.EKFAC, curvlab.FOOF):
        obj = cls(capt)
        assert obj.layer_structure["attn"] == "exact"
        assert obj.layer_structure["head"] == "kronecker"
        assert R.rel_err(obj.blocks["attn"].to_dense(), block) <= RTOL
        assert R.rel_err(obj.solve(v, 0.1)[s], torch.linalg.solve(block + 0.1 * eye, v[s])) <= RTOL
        assert torch.isfinite(obj.solve(capt.grad, 0.1)).all()


class LinearTwin(nn.Module):
    """``SelfAttentionLM`` with attention written from ``nn.Linear`` projections around
    ``F.scaled_dot_product_attention`` (same parameters, same layout)."""

    def __init__(self, model: SelfAttentionLM):
        super().__init__()
        self.tok = model.tok
        self.in_proj = nn.Linear(E, 3 * E, dtype=torch.float64)
        self.out_proj = nn.Linear(E, E, dtype=torch.float64)
        with torch.no_grad():
            self.in_proj.weight.copy_(model.attn.in_proj_weight)
            self.in_proj.bias.copy_(model.attn.in_proj_bias)
            self.out_proj.weight.copy_(model.attn.out_proj.weight)
            self.out_proj.bias.copy_(model.attn.out_proj.bias)
        self.mlp, self.head = model.mlp, model.head

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        h = self.tok(tokens)
        q, k, v = self.in_proj(h).view(n, t, 3, H, E // H).permute(2, 0, 3, 1, 4)
        allowed = ~(_causal(t) | (tokens == PAD)[:, None, None, :])  # (N, 1, T, T)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.out_proj(a.transpose(1, 2).reshape(n, t, E))
        return self.head(self.mlp(h))


@pytest.mark.parametrize("name", ["self-batch-first", "self-seq-first-weights"])
def test_attention_projections_are_kronecker_layers(name):
    """A packed in-projection and out_proj are two Kronecker layers; their KFAC / EKFAC /
    FOOF equal those of the same attention written from nn.Linear layers (whose factors
    tests/test_kfac.py checks against dense references), for both KFAC approximations."""
    model, x, y = _build(name)
    twin = LinearTwin(model)
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    assert [type(lc.info) for lc in capt.layers][1:3] == [InProjectionKind, OutProjectionKind]
    assert [lc.name for lc in capt.layers][1:3] == ["attn", "attn.out_proj"]
    capt_twin = curvlab.capture(twin, loss_fn, x, y, fisher="exact")
    assert R.rel_err(capt.grad, capt_twin.grad) <= RTOL
    objs = [(curvlab.FOOF, {})] + [(curvlab.EKFAC, {})]
    objs += [(curvlab.KFAC, {"kfac_approx": a}) for a in ("expand", "reduce")]
    for cls, kw in objs:
        got, want = cls(capt, **kw).to_dense(), cls(capt_twin, **kw).to_dense()
        assert R.rel_err(got, want) <= RTOL, (cls.__name__, kw)


def test_attention_ggn_matches_curvlinops():
    pytest.importorskip("curvlinops")
    for name in ("self-batch-first", "cross-seq-first"):
        model, x, y = _build(name)
        y = y.clamp(min=0)  # curvlinops' GGN: no ignored targets
        loss_fn = nn.CrossEntropyLoss()
        G = S.curvlinops_ggn(model, loss_fn, x, y)
        capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
        assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), G) <= RTOL, name


class _WeightsInLoss(SelfAttentionLM):
    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens)
        a, w = self.attn(h, h, h, need_weights=True)
        return self.head(self.mlp(h + a)) + w.sum(-1, keepdim=True)


class _GradMask(SelfAttentionLM):
    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens)
        a, _ = self.attn(h, h, h, attn_mask=self.tok.weight[:T, :T])
        return self.head(self.mlp(h + a))


class _Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H)
        self.head = nn.Linear(E, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.stack([self.attn(xn, xn, xn)[0] for xn in x]))


def test_attention_refusals():
    """Train-mode attention dropout, attention weights reaching the loss, masks that
    require grad and unbatched calls are refused with a curvlab error."""
    _, x, y = _build("self-batch-first")
    loss_fn = nn.CrossEntropyLoss()
    model = SelfAttentionLM(batch_first=True).double()
    model.attn.dropout = 0.1
    with pytest.raises(UnsupportedModelError, match="dropout"):
        curvlab.capture(model, loss_fn, x, y)
    model.eval()  # no dropout in eval mode
    curvlab.capture(model, loss_fn, x, y)
    with pytest.raises(UnsupportedModelError, match="also used outside module 'attn'"):
        curvlab.capture(_WeightsInLoss(batch_first=True).double(), loss_fn, x, y)
    with pytest.raises(UnsupportedModelError, match="attn_mask that requires grad"):
        curvlab.capture(_GradMask(batch_first=True).double(), loss_fn, x, y)
    xs = torch.randn(N, T, E, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match="unbatched"):
        curvlab.capture(_Unbatched().double(), loss_fn, xs, y)


def test_frozen_attention_dropout_is_known_randomness():
    """A frozen attention module with dropout in train mode is named among the random
    modules and switched off for the independence probe (no false coupling)."""
    model, x, y = _build("self-batch-first")
    model.attn.dropout = 0.5
    model.attn.requires_grad_(False)
    assert random_modules(model) == ["attn"]
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), x, y, fisher="exact")
    assert capt.coupling is None
    assert not any(isinstance(lc.info, AttentionKind) for lc in capt.layers)


@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "MATH"])
def test_batched_forward_on_any_attention_kernel(backend):
    """The batched forward on the flash kernel (CPU) or the math kernel: the same exact
    GGN (the per-sample recomputation runs the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x, y = _build("self-causal-hint")
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(getattr(SDPBackend, backend)):
        capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    ref = S.dense_ggn(model, loss_fn, x, y)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), ref) <= RTOL
    assert R.rel_err(capt.grad, _reference_gradient(model, loss_fn, x, y)) <= RTOL


def test_compare_runs_on_attention():
    """curvlab.compare with exact, block-diagonal, KFAC, EKFAC on a cross-attention
    model: every method has records, all finite."""
    model, x, y = _build("cross-seq-first")
    methods = ["exact", "blockdiag", "kfac", "ekfac"]
    records = curvlab.compare(
        model,
        nn.CrossEntropyLoss(),
        x,
        y,
        fisher="exact",
        methods=methods,
        damping=[1e-2],
        sections=["cosine", "relative_error"],
        progress=False,
    )
    assert {r.method for r in records} >= set(methods)
    assert all(torch.isfinite(torch.tensor(float(r.value))) for r in records)


@pytest.mark.parametrize("name", ["self-batch-first", "cross-three-inputs"])
def test_forward_hook_on_attention(name):
    """A user's forward hook that rescales ``attn_output`` acts downstream of the module;
    curvlab's recomputations from the recorded call do not run it."""
    model, x, y = _build(name)
    model.attn.register_forward_hook(lambda m, args, out: (1.5 * out[0], out[1]))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    assert R.rel_err(capt.grad, _reference_gradient(model, loss_fn, x, y)) <= RTOL
    ref = S.dense_ggn(model, loss_fn, x, y)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), ref) <= RTOL

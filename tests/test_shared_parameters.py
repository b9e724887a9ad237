"""Parameters used by several module calls: tied embedding/head weights, one module
applied twice, tied modules called out of registration order.

Every capture's gradient is checked against autograd; the exact Fisher (all Fisher
types) against dense float64 references of the whole batch (tests/reference.py,
tests/sequence_reference.py: torch.func Jacobians with the model's own tying), the
block-diagonal Fisher against the reference's diagonal blocks (one block per module
that ``model.parameters()`` lists the parameters under), the Kronecker methods' exact
blocks for the shared layers, and the tied transformer's GGN against curvlinops.
Tolerance: relative error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import json

import pytest
import reference as R
import sequence_reference as S
import torch
from conftest import DAMPINGS, RTOL, mc_generator
from torch import Tensor, nn

import curvlab
from curvlab.errors import MemoryBudgetError
from curvlab.layers import SharedKind, find_layers, layers_in_forward
from curvlab.models import build_model
from curvlab.transformer import TransformerLM

N, T, V = 2, 5, 11


# ----------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------


def _tied_transformer(padding_idx: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = TransformerLM(V, T, width=8, depth=1, heads=2, tie_weights=True).double()
    model.tok.padding_idx = padding_idx
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and head bias
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
        model.head.bias.normal_(0.0, 0.3)
    return model


def _tokens() -> tuple[Tensor, Tensor]:
    """Tokens (0 included, the padding token of the padded variant) and next-token
    targets with ignored positions."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (N, T), generator=g)
    x[0, 1] = x[1, 4] = 0
    y = torch.randint(0, V, (N, T), generator=g)
    y[1, 0] = y[0, 3] = -100
    return x, y


class SharedResidual(nn.Module):
    """One ``nn.Linear`` applied twice in a residual MLP: ``h + tanh(W h)`` twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.shared(h))
        h = h + torch.tanh(self.shared(h))
        return self.head(h)


class ConvTwice(nn.Module):
    """One ``nn.Conv2d`` applied twice with a residual: a repeated layer whose locations
    have a geometry, read as a shared layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x.view(-1, 2, 3, 3)
        h = h + torch.tanh(self.conv(h))
        h = torch.tanh(self.conv(h))
        return self.head(h.flatten(1))


class TiedOutOfOrder(nn.Module):
    """Modules registered in another order than they are called; ``second`` (registered
    first) has its own bias and the weight of ``first``, which is called twice."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.second = nn.Linear(5, 5)
        self.first = nn.Linear(5, 5, bias=False)
        self.second.weight = self.first.weight
        self.early = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.early(x))
        h = torch.tanh(self.first(h))
        h = torch.tanh(self.second(h)) + self.first(h)
        return self.head(h)


def _small(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def _data(n: int = 6, d: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=torch.float64, generator=gen), torch.randint(
        0, 3, (n,), generator=gen
    )


def _owner_blocks(model: nn.Module) -> list[int]:
    """Sizes of the diagonal blocks: the parameters ``model.named_parameters()`` lists
    under each module (an ``nn.MultiheadAttention`` with separate q/k/v projections or
    trainable ``bias_k``/``bias_v`` together with its ``out_proj``), in order
    (independent of curvlab's layer discovery)."""
    attention = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        and (not m._qkv_same_embed_dim or m.bias_k is not None and m.bias_k.requires_grad)
    ]
    sizes: dict[str, int] = {}
    for name, p in R.trainable_params(model).items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        owner = next((a for a in attention if owner.startswith(a)), owner)
        sizes[owner] = sizes.get(owner, 0) + p.numel()
    return list(sizes.values())


def _block_diagonal(D: Tensor, sizes: list[int]) -> Tensor:
    out = torch.zeros_like(D)
    start = 0
    for k in sizes:
        out[start : start + k, start : start + k] = D[start : start + k, start : start + k]
        start += k
    return out


def _check_all(capt, model, ref: Tensor, g_ref: Tensor, what: str) -> None:
    """Gradient, exact Fisher interface, natural gradient, block-diagonal Fisher and the
    exact blocks the Kronecker methods use for shared layers."""
    assert R.rel_err(capt.grad, g_ref) <= RTOL, f"{what}: Capture.grad"
    obj = curvlab.ExactFisher(capt)
    R.assert_close_all(R.interface_errors(obj, ref, DAMPINGS), RTOL, what)
    eye = torch.eye(ref.shape[0], dtype=torch.float64)
    for lam in DAMPINGS:
        expect = torch.linalg.solve(ref + lam * eye, g_ref)
        assert R.rel_err(obj.natural_gradient(lam), expect) <= RTOL, f"{what}: NG λ={lam}"
        assert R.rel_err(obj.solve(capt.grad, lam), expect) <= RTOL, f"{what}: solve(g) λ={lam}"
    sizes = _owner_blocks(model)
    assert [lc.info.num_params for lc in capt.layers] == sizes
    bd_ref = _block_diagonal(ref, sizes)
    bd = curvlab.BlockDiagFisher(capt)
    R.assert_close_all(R.interface_errors(bd, bd_ref, DAMPINGS), RTOL, f"{what} blockdiag")
    shared = [lc for lc in capt.layers if isinstance(lc.info, SharedKind)]
    for cls in (curvlab.KFAC, curvlab.EKFAC, curvlab.FOOF):
        approx = cls(capt)
        for lc in shared:
            assert approx.layer_structure[lc.name] == "exact"
            s = lc.info.slice
            got = approx.blocks[lc.name].to_dense()
            assert R.rel_err(got, ref[s, s]) <= RTOL, f"{what}: {cls.__name__} {lc.name}"


# ----------------------------------------------------------------------------------
# tied embedding / head on the complete tiny transformer
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_tied_transformer_against_dense(fisher, padding_idx):
    """Token-level CE with ignored targets; with ``padding_idx`` the embedding gives the
    padding row no gradient but the head still does."""
    model, (x, y) = _tied_transformer(padding_idx), _tokens()
    assert model.head.weight is model.tok.weight
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher=fisher, generator=mc_generator(5))
    kinds = {lc.name: type(lc.info).__name__ for lc in capt.layers}
    assert kinds["tok"] == kinds["head"] == "SharedKind"
    assert [lc.name for lc in capt.layers][-1] == "head"  # the head's bias, at its place
    params = list(R.trainable_params(model).values())
    g_ref = R.flatten(torch.autograd.grad(S.user_loss(loss_fn, model(x), y), params))
    if fisher == "exact":
        ref = S.dense_ggn(model, loss_fn, x, y)
    elif fisher == "empirical":
        ref = S.dense_empirical(model, loss_fn, x, y)
    else:
        ref = S.dense_from_columns(model, x, capt.columns, capt.scale)
    _check_all(capt, model, ref, g_ref, f"tied transformer {fisher} pad={padding_idx}")


def test_tied_transformer_mse_on_sequences():
    """MSE on the ``(N, T, V)`` outputs of the tied transformer (exact GGN)."""
    model, (x, _) = _tied_transformer(), _tokens()
    y = torch.randn(N, T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss_fn = nn.MSELoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    params = list(R.trainable_params(model).values())
    g_ref = R.flatten(torch.autograd.grad(loss_fn(model(x), y), params))
    _check_all(capt, model, S.dense_ggn(model, loss_fn, x, y), g_ref, "tied transformer mse")


def test_tied_transformer_ggn_matches_curvlinops():
    pytest.importorskip("curvlinops")
    model, (x, y) = _tied_transformer(), _tokens()
    y = y.clamp(min=0)  # curvlinops' GGN: no ignored targets
    loss_fn = nn.CrossEntropyLoss()
    G = S.curvlinops_ggn(model, loss_fn, x, y)
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    R.assert_capture_grad(capt, model, _TokenCE(), x, y)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), G) <= RTOL


class _TokenCE(nn.CrossEntropyLoss):
    """The token-level loss as a user writes it (for the autograd gradient check)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return super().forward(input.flatten(0, -2), target.flatten())


def test_built_in_tied_transformer():
    """``transformer-tied`` ties the head to the token embedding; one shared layer holds
    the matrix once, at the embedding's place."""
    model = build_model("transformer-tied", (8,), 20, width=16, depth=1, heads=2)
    assert model.head.weight is model.tok.weight
    layers = find_layers(model)
    assert [type(i).__name__ for i in layers[:2]] == ["SharedKind", "EmbeddingKind"]
    assert [u.name for u in layers[0].uses] == ["tok", "head"]
    assert layers[-1].name == "head" and layers[-1].params == [model.head.bias]
    assert sum(i.num_params for i in layers) == R.num_params(model)


# ----------------------------------------------------------------------------------
# a module called twice, tied modules called out of registration order
# ----------------------------------------------------------------------------------

LOSSES = {
    "ce-mean": (nn.CrossEntropyLoss(), None),
    "mse-sum": (nn.MSELoss(reduction="sum"), 3),
}


@pytest.mark.parametrize("cls", [SharedResidual, ConvTwice, TiedOutOfOrder])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_shared_modules_against_dense(cls, loss_name, fisher):
    model, (X, y) = _small(cls), _data(d=18 if cls is ConvTwice else 4)
    loss_fn, width = LOSSES[loss_name]
    if width is not None:
        y = torch.randn(X.shape[0], width, dtype=torch.float64)
    capt = curvlab.capture(model, loss_fn, X, y, fisher=fisher, generator=mc_generator(2))
    R.assert_capture_grad(capt, model, loss_fn, X, y)
    if fisher == "exact":
        ref = R.dense_ggn(model, loss_fn, X, y)
    elif fisher == "empirical":
        ref = R.dense_empirical_fisher(model, loss_fn, X, y)
    else:
        ref = R.dense_fisher_from_columns(model, X, capt.columns, capt.scale)
    _check_all(capt, model, ref, R.batch_gradient(model, loss_fn, X, y), f"{cls.__name__}")


def test_shared_layers_and_their_uses():
    """The Linear applied twice stays a Kronecker layer whose locations are its two
    calls; the conv applied twice is a shared layer (found by the capture, or by one
    forward pass); ``second``'s tied weight belongs to ``first``'s place in
    ``model.parameters()`` (registered there first), its bias stays a layer of its own."""
    model, (X, y) = _small(SharedResidual), _data()
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y)
    lc = capt.layers[1]
    assert type(lc.info).__name__ == "LinearKind" and lc.info.kronecker
    assert lc.a.shape == (X.shape[0], 2, 7) and lc.locations == (2,)
    model, (X, y) = _small(ConvTwice), _data(d=18)
    assert type(find_layers(model)[0]).__name__ == "ConvKind"  # repeated calls: capture
    assert isinstance(layers_in_forward(model, X)[0], SharedKind)  # or one forward pass
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y)
    shared = capt.layers[0].info
    assert isinstance(shared, SharedKind) and [u.name for u in shared.uses] == ["conv"]
    model = _small(TiedOutOfOrder)
    layers = {i.name: i for i in find_layers(model)}
    assert list(layers) == ["head", "second", "early"]
    assert layers["second"].params == [model.second.weight, model.second.bias]
    assert [u.name for u in layers["second"].uses] == ["second", "first"]


def test_optimizer_steps_on_a_shared_block():
    """A natural-gradient optimizer step on the model with a module called twice equals
    ``−lr`` times the exact natural gradient (the optimizer reads the capture's layers)."""
    model, (X, y) = _small(SharedResidual), _data()
    loss_fn = nn.CrossEntropyLoss()
    before = R.flatten(p.detach().clone() for p in model.parameters())
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    R.assert_capture_grad(capt, model, loss_fn, X, y)
    step = curvlab.ExactFisher(capt).natural_gradient(0.1)
    opt = curvlab.optim.NaturalGradient(model, loss_fn, lr=0.5, damping=0.1, fisher="exact")
    opt.step(X, y)
    after = R.flatten(p.detach() for p in model.parameters())
    assert R.rel_err(after, before - 0.5 * step) <= RTOL
    kfac = curvlab.optim.KFAC(model, loss_fn, lr=0.1, damping=0.1)
    kfac.step(X, y)
    assert kfac.preconditioner.layer_structure["shared"] == "kronecker"
    model, (X, y) = _small(ConvTwice), _data(d=18)
    kfac = curvlab.optim.KFAC(model, loss_fn, lr=0.1, damping=0.1)
    kfac.step(X, y)
    assert kfac.preconditioner.layer_structure["conv"] == "exact"


def test_shared_layer_memory_budget(monkeypatch):
    """The per-sample gradients of a shared layer are estimated first: above the budget
    one error names the calls, the estimate and the ways out."""
    model, (x, y) = _tied_transformer(), _tokens()
    # 40 MC columns: their Gram (38 KB) fits, the shared layer's 21 x 2 x (88 + 99)
    # float64 per-sample gradients (63 KB) do not
    monkeypatch.setattr(curvlab.config.options, "memory_budget", 50_000)
    match = r"layer 'tok'.*2 module calls \('tok', 'head'\).*smaller batch.*untie"
    with pytest.raises(MemoryBudgetError, match=match):
        curvlab.capture(model, nn.CrossEntropyLoss(), x, y, fisher="mc", mc_samples=20)


def test_cli_compare_tied_transformer(tmp_path):
    """``curvlab compare --model transformer-tied --data text`` runs, and the report's
    configuration names the shared layers among those treated exactly."""
    from curvlab.cli import main

    out = tmp_path / "c"
    argv = ["compare", "--model", "transformer-tied", "--data", "text", "--batch-size", "2"]
    argv += ["--methods", "exact,kfac,sgd", "--sections", "cosine", "--damping", "0.1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    exact = payload["config"]["problems"]["transformer-tied"]["exact_layers"]
    assert {"tok", "head"} <= set(exact) and "pos" not in exact


class AttentionTwice(nn.Module):
    """One sequence-first ``nn.MultiheadAttention`` (batch at dimension 1) applied twice
    with residuals."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(0, 1)
        h = x + self.att(x, x, x, need_weights=False)[0]
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.head(h.transpose(0, 1))


def test_attention_called_twice_against_dense():
    model = _small(AttentionTwice).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (3, 5), generator=gen)
    y[0, 2] = -100
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    params = list(R.trainable_params(model).values())
    g_ref = R.flatten(torch.autograd.grad(S.user_loss(loss_fn, model(x), y), params))
    _check_all(capt, model, S.dense_ggn(model, loss_fn, x, y), g_ref, "attention twice")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_of_a_linear_called_twice(approx):
    """KFAC of the Linear applied twice, against factors built here from hooks and
    autograd: the two calls are the weight-sharing dimension (expand: ``A`` averages
    ``ā āᵀ`` over samples and calls, ``G = s Σ e eᵀ``; reduce: the calls' mean input and
    summed output-gradient per sample)."""
    model, (X, y) = _small(SharedResidual), _data()
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    inputs, outputs = [], []

    def hook(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    handle = model.shared.register_forward_hook(hook)
    f = model(X)
    handle.remove()
    n, k = X.shape[0], len(outputs)
    a = torch.stack([torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) for x in inputs], 1)
    e = torch.stack(
        [
            torch.stack(torch.autograd.grad(f, outputs, col, retain_graph=True), 1)
            for col in capt.columns
        ]
    )  # (C', N, calls, d_out)
    s = capt.scale
    if approx == "expand":
        A = torch.einsum("nki,nkj->ij", a, a) / (n * k)
        G = s * torch.einsum("cnko,cnkp->op", e, e)
    else:
        am, es = a.mean(1), e.sum(2)
        A, G = am.T @ am / n, s * torch.einsum("cno,cnp->op", es, es)
    d_out, d_in = model.shared.weight.shape
    wb = torch.kron(G, A)  # row-major [W | b]
    pos = torch.arange(d_out * (d_in + 1)).view(d_out, d_in + 1)
    flat = torch.cat([pos[:, :d_in].reshape(-1), pos[:, d_in]])
    expect = wb[flat][:, flat]
    kfac = curvlab.KFAC(capt, damping_mode="standard", kfac_approx=approx)
    assert kfac.layer_structure["shared"] == "kronecker"
    assert R.rel_err(kfac.blocks["shared"].to_dense(), expect) <= RTOL

"""Every convolution variant against dense float64 references built without curvlab.

Variants: ``nn.Conv1d/2d/3d`` with groups (depthwise included), stride, padding
(``'same'`` with uneven amounts, padding modes ``reflect``/``replicate``/``circular``),
dilation, with and without bias; ``nn.ConvTranspose1d/2d/3d`` with stride, padding,
``output_padding``, groups and dilation.  Exact objects: the dense GGN / empirical Fisher
/ MC Fisher of ``tests/reference.py`` (per-sample Jacobians of the whole model), every
member at relative error ≤ 1e-8; ``Capture.grad`` against autograd.

Kronecker factors (one pair per group): the reference never unfolds anything.  The
Jacobian of the layer output w.r.t. its own parameters gives, for every parameter ``p``,
the output channel ``o(p)`` it writes and the input ``X[n, t, p] = ∂y[n, o(p), t]/∂θ_p``
it multiplies at location ``t``; the output-gradients ``E[c, n, t, p] = e[c, n, o(p), t]``
come from ``torch.func`` Jacobians of the rest of the model.  Then, in the flat layout,

    KFAC[p, q] = [group(p) = group(q)] · mean_nt X_p X_q · s Σ_cnt E_p E_q

("expand"; "reduce" averages ``X`` and sums ``E`` over ``t`` first), FOOF keeps
``[o(p) = o(q)]`` in place of the ``G`` factor, and EKFAC must commute with KFAC, vanish
between groups, and satisfy ``⟨C, F⟩ = ‖C‖²`` and ``tr C = Σ_g tr F_gg``.

Peer: curvlinops' ``KFACLinearOperator`` supports grouped ``Conv2d`` with another
convention: one factor pair for the whole layer, ``A`` from the input patches averaged
over the channel groups and ``G`` over all output channels.  Its ``G``'s diagonal blocks
are curvlab's ``G_g``, and its ``A`` is the covariance of the group mean of curvlab's
group patches; both are checked.  curvlinops has no KFAC for ``Conv1d``/``Conv3d`` or
transposed convolutions.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import RTOL, make_loss, make_targets, mc_generator
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab
from curvlab.curvature.gram import choose_scheme
from curvlab.layers import find_layers
from curvlab.layers.conv import InputProducts

N = 5
NUM_OUT = 3
DAMPINGS = [1e-3, 1e-1]

# name -> (conv layer, per-sample input shape)
VARIANTS: dict[str, tuple] = {
    "conv1d-grouped": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (4, 9),
    ),
    "conv1d-replicate": (lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="replicate"), (2, 6)),
    "conv2d-depthwise-same": (
        lambda: nn.Conv2d(3, 3, (4, 3), padding="same", dilation=(1, 2), groups=3),
        (3, 5, 6),
    ),
    "conv2d-grouped-reflect": (
        lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect", groups=2),
        (4, 5, 5),
    ),
    "conv2d-circular-nobias": (
        lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="circular", bias=False),
        (2, 4, 5),
    ),
    "conv2d-depthwise-multiplier": (lambda: nn.Conv2d(2, 4, 3, groups=2, bias=False), (2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 2, (2, 3, 2), stride=(1, 2, 1), padding=1), (2, 3, 4, 3)),
    "conv3d-grouped": (lambda: nn.Conv3d(4, 2, 2, groups=2, dilation=(1, 2, 1)), (4, 3, 4, 3)),
    "convT1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1, output_padding=2), (2, 4)),
    "convT2d-grouped": (
        lambda: nn.ConvTranspose2d(
            4,
            6,
            (3, 2),
            stride=(2, 1),
            padding=(1, 0),
            output_padding=(1, 0),
            groups=2,
            dilation=(1, 2),
        ),
        (4, 3, 3),
    ),
    "convT2d-depthwise-nobias": (
        lambda: nn.ConvTranspose2d(3, 3, 3, stride=2, padding=2, groups=3, bias=False),
        (3, 4, 4),
    ),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=(0, 1, 0)), (2, 2, 3, 2)),
    "convT3d-grouped": (
        lambda: nn.ConvTranspose3d(4, 2, 2, stride=(1, 2, 1), groups=2),
        (4, 2, 2, 2),
    ),
}
GROUPED = {name for name, (build, _) in VARIANTS.items() if build().groups > 1}
# (variant, loss, fisher) cycling through the loss and Fisher types
CASES = [
    (name, loss, fisher)
    for name, loss, fisher in zip(
        VARIANTS,
        ["ce-mean", "mse-sum", "bce-mean", "ce-sum", "mse-mean"] * 3,
        ["exact", "mc", "empirical", "mc", "exact", "empirical", "exact"] * 2,
    )
]


class Skip(nn.Module):
    """The convolution between two small layers, with a skip connection around it when
    the shapes allow (otherwise a parallel pooled path), then a classifier."""

    def __init__(self, conv: nn.Module, in_shape: tuple[int, ...]):
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            out = conv(torch.zeros(1, *in_shape))
        self.skip = out.shape[1:] == torch.Size(in_shape)
        self.head = nn.Linear(out[0].numel(), NUM_OUT)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(self.conv(x))
        if self.skip:
            y = y + x
        return self.head(y.flatten(1))


_PROBLEMS: dict = {}


def build(name: str, loss_name: str):
    """(model, loss, X, y) in float64, cached."""
    key = (name, loss_name)
    if key not in _PROBLEMS:
        make, shape = VARIANTS[name]
        torch.manual_seed(11)
        model = Skip(make(), shape).double()
        gen = torch.Generator().manual_seed(4)
        X = torch.randn(N, *shape, generator=gen, dtype=torch.float64)
        y = make_targets(loss_name, N, gen=gen)
        _PROBLEMS[key] = (model, make_loss(loss_name), X, y)
    return _PROBLEMS[key]


def capture(name: str, loss_name: str, fisher: str):
    model, loss_fn, X, y = build(name, loss_name)
    capt = curvlab.capture(model, loss_fn, X, y, fisher=fisher, generator=mc_generator(2))
    assert R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, y)) <= RTOL
    return capt


def dense_fisher(name: str, loss_name: str, fisher: str, capt) -> Tensor:
    model, loss_fn, X, y = build(name, loss_name)
    if fisher == "exact":
        return R.dense_ggn(model, loss_fn, X, y)
    if fisher == "empirical":
        return R.dense_empirical_fisher(model, loss_fn, X, y)
    return R.dense_fisher_from_columns(model, X, capt.columns, capt.scale)


def test_kinds():
    """Grouped convolutions (depthwise included) take GroupedConvKind, the others the
    Kronecker ConvKind; none takes the generic torch.func path."""
    for name in VARIANTS:
        model = build(name, "ce-mean")[0]
        kind = type(find_layers(model)[0]).__name__
        assert kind == ("GroupedConvKind" if name in GROUPED else "ConvKind"), name


@pytest.mark.parametrize("name,loss_name,fisher", CASES)
def test_exact_objects(name, loss_name, fisher):
    """ExactFisher (incl. natural_gradient) and BlockDiagFisher: every member."""
    capt = capture(name, loss_name, fisher)
    F = dense_fisher(name, loss_name, fisher, capt)
    R.assert_close_all(R.interface_errors(curvlab.ExactFisher(capt), F, DAMPINGS), RTOL, name)
    for lam in DAMPINGS:
        expect = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), capt.grad)
        assert R.rel_err(curvlab.ExactFisher(capt).natural_gradient(lam), expect) <= RTOL
    s = capt.layers[0].info.slice
    D = torch.block_diag(F[s, s], F[s.stop :, s.stop :])
    bd = curvlab.BlockDiagFisher(capt)
    R.assert_close_all(R.interface_errors(bd, D, DAMPINGS), RTOL, f"BlockDiagFisher {name}")


@pytest.mark.parametrize("name", [name for name in VARIANTS if name not in GROUPED])
def test_pairs_through_input_products(name, monkeypatch: pytest.MonkeyPatch):
    """The location products ``ā·ā'`` from the input's channel products
    (:class:`InputProducts`) equal the patches' own for every geometry here (padding
    modes, ``'same'``, dilation, stride, transposed, bias or not), to float64 rounding;
    the location-pair Gram built on them gives every member of ExactFisher and its
    natural gradient as the dense reference does; and a capture attaches them exactly
    where they cost fewer multiply-adds than the patches' products and the scheme
    choice then takes location pairs."""
    model, loss_fn, X, y = build(name, "ce-mean")
    capt = capture(name, "ce-mean", "mc")
    lc = capt.layers[0]
    products = InputProducts.of(X, lc.info.geometry, lc.info.has_bias)
    n, t, d = lc.a.shape
    flat = lc.a.reshape(n * t, d)
    expect = (flat @ flat.T).view(n, t, n, t)
    assert torch.allclose(products(0, n, n, torch.float64), expect, rtol=1e-12, atol=1e-12)
    assert torch.allclose(products(2, 4, 3, torch.float64), expect[2:4, :, :3], atol=1e-12)
    with monkeypatch.context() as m:  # one sample's grid at a time
        m.setattr(curvlab.config.options, "chunk_bytes", 1)
        assert torch.allclose(products(0, n, n, torch.float64), expect, rtol=1e-12, atol=1e-12)
    c, d_out = lc.e.shape[0], lc.e.shape[-1]
    pairs = choose_scheme(n, c, t, d, d_out, products) == "pairs"
    cheaper = products.cost(n) < (n * t) ** 2 * d
    assert (lc.products is not None) == (cheaper and pairs), name
    lc.products = products  # the pair route through them, whichever is cheaper here
    F = dense_fisher(name, "ce-mean", "mc", capt)
    fisher = curvlab.ExactFisher(capt, scheme="pairs")
    R.assert_close_all(R.interface_errors(fisher, F, DAMPINGS), RTOL, name)
    for lam in DAMPINGS:
        expect_ng = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), capt.grad)
        got = curvlab.ExactFisher(capt, scheme="pairs").natural_gradient(lam)
        assert R.rel_err(got, expect_ng) <= RTOL


def test_capture_attaches_input_products_where_pairs_take_them():
    """A stride-1 conv with few locations and many channels: the capture attaches its
    input products, the automatic scheme takes location pairs through them, and
    ExactFisher matches the dense reference (every member, and the natural gradient)."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, NUM_OUT)
    ).double()
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(N, 16, 2, 2, generator=gen, dtype=torch.float64)
    y = make_targets("ce-mean", N, gen=gen)
    loss_fn = make_loss("ce-mean")
    capt = curvlab.capture(model, loss_fn, X, y, fisher="mc", generator=mc_generator(3))
    lc = capt.layers[0]
    assert isinstance(lc.products, InputProducts)
    n, t, d = lc.a.shape
    assert choose_scheme(n, lc.e.shape[0], t, d, lc.e.shape[-1], lc.products) == "pairs"
    F = R.dense_fisher_from_columns(model, X, capt.columns, capt.scale)
    R.assert_close_all(R.interface_errors(curvlab.ExactFisher(capt), F, DAMPINGS), RTOL, "conv")
    for lam in DAMPINGS:
        expect = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), capt.grad)
        assert R.rel_err(curvlab.ExactFisher(capt).natural_gradient(lam), expect) <= RTOL


class _Residual(nn.Module):
    """``head(x + tanh(conv(x)))``: a skip connection around a stride-1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(64, NUM_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x + torch.tanh(self.conv(x))).flatten(1))


def test_input_products_float32_residual_small_damping():
    """float32 residual net, damping 1e-6: the capture attaches the conv's input products;
    the Gram through them equals the one from the patches to float64 rounding (relative
    1e-13: both are float64 sums of the same float32 data), and the natural gradient
    agrees to float32 rounding (relative 1e-6)."""
    torch.manual_seed(0)
    model = _Residual()
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(6, 16, 2, 2, generator=gen), torch.randint(0, NUM_OUT, (6,), generator=gen)
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y, "mc", generator=mc_generator(1))
    lc = capt.layers[0]
    assert isinstance(lc.products, InputProducts)
    through = curvlab.ExactFisher(capt)
    gram, ng = through.gram.clone(), through.natural_gradient(1e-6)
    lc.products = None
    patches = curvlab.ExactFisher(capt)
    assert R.rel_err(gram, patches.gram) <= 1e-13
    assert ng.dtype == torch.float32
    assert R.rel_err(ng.double(), patches.natural_gradient(1e-6).double()) <= 1e-6


# ----------------------------------------------------------------------------------
# Kronecker factors: the parameter-wise reference
# ----------------------------------------------------------------------------------


def layer_inputs_and_gradients(name: str, loss_name: str, columns: Tensor):
    """``X (N, T, P_l)``, ``E (C', N, T, P_l)`` and the output channel ``o(p)`` of each
    parameter ``(P_l,)`` for the convolution of the problem (module docstring)."""
    model, _, X, _ = build(name, loss_name)
    conv = model.conv
    params = {k: p.detach() for k, p in conv.named_parameters()}

    def layer(theta: dict, x: Tensor) -> Tensor:
        return functional_call(conv, theta, (x,))

    y = layer(params, X).detach()
    jac = jacrev(layer)(params, X)  # name -> (N, C_out, *spatial, *param.shape)
    J = torch.cat([j.flatten(2 + y.dim() - 2) for j in jac.values()], dim=-1)
    J = J.flatten(2, -2)  # (N, C_out, T, P_l)
    owner = J.abs().sum(dim=(0, 2)).argmax(dim=0)  # o(p)
    idx = owner.view(1, 1, 1, -1).expand(J.shape[0], 1, J.shape[2], -1)
    inputs = J.gather(1, idx).squeeze(1)  # (N, T, P_l)

    def rest(yn: Tensor) -> Tensor:
        out = torch.tanh(yn)
        if model.skip:
            out = out + xn_holder[0]
        return model.head(out.flatten())

    grads = []
    for n in range(X.shape[0]):
        xn_holder = [X[n]]
        jn = jacrev(rest)(y[n])  # (NUM_OUT, C_out, *spatial)
        grads.append(torch.einsum("co,o...->c...", columns[:, n], jn))
    e = torch.stack(grads, dim=1).flatten(3)  # (C', N, C_out, T)
    E = e[:, :, owner].transpose(-1, -2)  # (C', N, T, P_l)
    return inputs, E, owner


def group_of(name: str, owner: Tensor) -> Tensor:
    """The group of each parameter from its output channel."""
    conv = build(name, "ce-mean")[0].conv
    c_out = conv.out_channels
    return owner // (c_out // conv.groups)


def reference_factors(name, loss_name, capt, approx):
    X, E, owner = layer_inputs_and_gradients(name, loss_name, capt.columns)
    groups = group_of(name, owner)
    if approx == "reduce":
        X, E = X.mean(dim=1, keepdim=True), E.sum(dim=2, keepdim=True)
    n, t = X.shape[:2]
    A = torch.einsum("ntp,ntq->pq", X, X) / (n * t)
    G = capt.scale * torch.einsum("cntp,cntq->pq", E, E)
    same = (groups.unsqueeze(0) == groups.unsqueeze(1)).to(A.dtype)
    return A, G, same


def _layer_block(obj, capt) -> Tensor:
    return obj.blocks[capt.layers[0].name].to_dense()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors(name, approx):
    """KFAC's layer block (one factor pair per group) equals the parameter-wise
    reference; ``layer_structure`` says ``"kronecker"``; solve with both dampings."""
    capt = capture(name, "ce-mean", "mc")
    A, G, same = reference_factors(name, "ce-mean", capt, approx)
    want = same * A * G
    for mode in ("standard", "heuristic"):
        kfac = curvlab.KFAC(capt, damping_mode=mode, kfac_approx=approx)
        assert kfac.layer_structure[capt.layers[0].name] == "kronecker"
        block = kfac.blocks[capt.layers[0].name]
        assert R.rel_err(block.to_dense(), want) <= RTOL
    R.assert_close_all(
        R.interface_errors(curvlab.KFAC(capt, "standard", approx).blocks["conv"], want, DAMPINGS),
        RTOL,
        name,
    )
    factors = curvlab.KFAC(capt, kfac_approx=approx).factors
    expected = [f"conv[group {g}]" for g in range(build(name, "ce-mean")[0].conv.groups)]
    assert [k for k in factors if k.startswith("conv")] == (
        expected if name in GROUPED else ["conv"]
    )


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_kfac_heuristic_solve_per_group(name):
    """Heuristic damping uses each group's own π: the layer's solve inverts, per group,
    ``(A_g + π_g√λ I) ⊗ (G_g + √λ/π_g I)``, built parameter-wise from the reference
    (``I`` on the input side: parameters multiplying the same input; on the output
    side: parameters writing the same output channel)."""
    capt = capture(name, "ce-mean", "mc")
    A, G, same = reference_factors(name, "ce-mean", capt, "expand")
    X, _, owner = layer_inputs_and_gradients(name, "ce-mean", capt.columns)
    same_o = (owner.unsqueeze(0) == owner.unsqueeze(1)).to(A.dtype)
    cols = X.flatten(0, 1).T
    same_j = (cols.unsqueeze(0) == cols.unsqueeze(1)).all(-1).to(A.dtype)
    kfac = curvlab.KFAC(capt)
    lam, root = 0.1, 0.1**0.5
    pi = torch.empty(A.shape[0], dtype=A.dtype)
    for g in range(build(name, "ce-mean")[0].conv.groups):
        f = kfac.factors[f"conv[group {g}]"]
        ta, tg = f.A.trace() / f.A.shape[0], f.G.trace() / f.G.shape[0]
        assert abs(f.pi - float((ta / tg).sqrt())) <= 1e-12 * f.pi
        pi[group_of(name, owner) == g] = f.pi
    p = pi.unsqueeze(1)
    M = same * (A + p * root * same_j) * (G + root / p * same_o)
    v = R.random_vector(A.shape[0])
    assert R.rel_err(kfac.blocks["conv"].solve(v, lam), torch.linalg.solve(M, v)) <= RTOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_foof_and_ekfac(name):
    """FOOF: ``[o(p) = o(q)] · A`` per group (plain damping: every member).  EKFAC:
    commutes with the reference KFAC block, zero between groups, ``⟨C, F⟩ = ‖C‖²`` and
    ``tr C = Σ_g tr F_gg`` for the layer's exact block ``F``."""
    capt = capture(name, "ce-mean", "mc")
    A, G, same = reference_factors(name, "ce-mean", capt, "expand")
    owner = layer_inputs_and_gradients(name, "ce-mean", capt.columns)[2]
    same_o = (owner.unsqueeze(0) == owner.unsqueeze(1)).to(A.dtype)
    foof = curvlab.FOOF(capt).blocks["conv"]
    R.assert_close_all(R.interface_errors(foof, same_o * A, DAMPINGS), RTOL, f"FOOF {name}")
    assert curvlab.FOOF(capt).layer_structure["conv"] == "kronecker"

    K = same * A * G
    ekfac = curvlab.EKFAC(capt)
    assert ekfac.layer_structure["conv"] == "kronecker"
    C = _layer_block(ekfac, capt)
    s = capt.layers[0].info.slice
    F = dense_fisher(name, "ce-mean", "mc", capt)[s, s]
    scale = C.norm() * K.norm()
    assert float((C @ K - K @ C).norm() / scale) <= RTOL
    assert float((C * (1 - same)).norm() / C.norm()) <= RTOL
    assert abs(float((C * F).sum() - C.square().sum())) <= RTOL * float(C.square().sum())
    assert abs(float(C.trace() - (F * same).trace())) <= RTOL * float(F.trace())
    ekfac_block = ekfac.blocks["conv"]
    d, s_stat = ekfac_block.eigenbasis_statistics(capt.layers[0], capt.scale)
    assert R.rel_err(d, s_stat) <= RTOL  # EKFAC's eigenvalues are the exact diagonal
    assert abs(ekfac_block.fisher_inner([capt.layers[0]], capt.scale) - float((C * F).sum())) <= (
        RTOL * float((C * F).sum())
    )


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_other_methods_use_exact_block(name):
    """KFOC, Shampoo and the diagonal methods have no per-group factors: grouped layers get
    their exact block there (``layer_structure`` says ``"exact"``)."""
    capt = capture(name, "ce-mean", "mc")
    s = capt.layers[0].info.slice
    F = dense_fisher(name, "ce-mean", "mc", capt)[s, s]
    for cls in (curvlab.KFOC, curvlab.Shampoo):
        obj = cls(capt)
        assert obj.layer_structure["conv"] == "exact", cls.__name__
        assert R.rel_err(_layer_block(obj, capt), F) <= RTOL, cls.__name__


def test_kfac_factors_vs_curvlinops_grouped_conv2d():
    """curvlinops' KFAC on a grouped Conv2d (module docstring): its G's diagonal blocks
    are curvlab's G_g, its A the covariance of the group-mean patches."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, NUM_OUT)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, 4, 5, 5, generator=gen, dtype=torch.float64)
    y = make_targets("ce-mean", N, gen=gen)
    loss_fn = make_loss("ce-mean")
    op = curvlinops.KFACLinearOperator(
        model,
        loss_fn,
        [p for p in model.parameters()],
        [(X, y)],
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    A_peer, G_peer = op._input_covariances["0"], op._gradient_covariances["0"]
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    factors = curvlab.KFAC(capt).factors
    o_g = 3
    for g in range(2):
        G_g = factors[f"0[group {g}]"].G
        assert R.rel_err(G_g, G_peer[g * o_g : (g + 1) * o_g, g * o_g : (g + 1) * o_g]) <= RTOL
    groups = capt.layers[0].groups
    mean_patches = torch.stack([lc.a for lc in groups]).mean(dim=0)  # (N, T, d_in_h)
    rows = mean_patches.reshape(-1, mean_patches.shape[-1])
    assert R.rel_err(rows.T @ rows / rows.shape[0], A_peer) <= RTOL

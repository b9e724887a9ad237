"""Every layer kind against dense float64 torch.func references (tests/reference.py).

Fixtures go beyond plain stacks: a ResNet block with a skip connection and eval
BatchNorm, a depthwise-separable block, nested custom modules with raw parameters,
parametrised and subclassed layers, modules called out of registration order, a
decoder with a transposed convolution and GroupNorm.  References: ``exact`` = the GGN
``Jᵀ ∇²L J``, ``empirical`` = per-sample gradients, ``mc`` = ``s Σ J_nᵀ g gᵀ J_n`` from
the capture's own sampled columns; all from per-sample Jacobians of the whole model
(no curvlab code).  Tolerance RTOL = 1e-8; ``Capture.grad`` is checked against
autograd on every capture.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import RTOL, make_loss, make_targets, mc_generator
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import curvlab
import curvlab.optim
from curvlab.errors import MemoryBudgetError, UnsupportedModelError
from curvlab.layers import find_layers
from curvlab.models import ResidualBlock

NUM_OUT = 3
N = 6


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and not isinstance(m, (nn.Linear, nn.Conv2d)):
                    p.uniform_(0.5, 1.5) if name == "weight" else p.uniform_(-0.5, 0.5)
    return model


def resnet() -> nn.Module:
    """Stem, a residual block, a depthwise-separable block, pooling, classifier."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        ResidualBlock(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),  # pointwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, NUM_OUT),
    )


def norms_mlp() -> nn.Module:
    """LayerNorm (with / without bias), PReLU (one and per-channel weights), RMSNorm,
    BatchNorm1d, on 2-D and sequence inputs."""
    return nn.Sequential(
        nn.Linear(4, 5),
        nn.LayerNorm(5),
        nn.PReLU(),
        nn.Linear(5, 6),
        nn.RMSNorm(6),
        nn.LayerNorm(6, bias=False),
        nn.Flatten(),
        nn.Linear(12, 5),
        nn.BatchNorm1d(5),
        nn.PReLU(5),
        nn.Linear(5, NUM_OUT),
    )


def decoder() -> nn.Module:
    """A grouped transposed conv (stride, output_padding), GroupNorm, a reflect-padded
    conv, a Conv3d with BatchNorm3d and a circularly padded Conv1d."""
    return nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
        nn.Unflatten(1, (1, 2)),
        nn.Conv3d(1, 2, (2, 3, 3), bias=False),
        nn.BatchNorm3d(2),
        nn.Flatten(2),
        nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular", dilation=1),
        nn.Flatten(),
        nn.Linear(2 * 4, NUM_OUT),
    )


class Scale(nn.Module):
    """A raw parameter used in the module's own forward."""

    def __init__(self, d: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp()


class ScaledLinear(nn.Linear):
    """A Linear subclass that changes the computation (must not be read as a Linear)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * super().forward(x) + self.bias.square()


class PlainLinear(nn.Linear):
    """A Linear subclass that keeps the computation (read as a Linear)."""


class Doubling(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w.tanh()


class Nested(nn.Module):
    """Custom modules inside custom modules, called out of registration order, with a
    parametrised, a weight-normed, a subclassed and a plain-subclass Linear."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, NUM_OUT)  # registered first, called last
        self.inner = nn.ModuleDict(
            {"scale": Scale(4), "odd": ScaledLinear(4, 5), "plain": PlainLinear(5, 5)}
        )
        self.param_lin = parametrize.register_parametrization(nn.Linear(5, 5), "weight", Doubling())
        self.normed = parametrizations.weight_norm(nn.Linear(5, 5, bias=False))
        self.offset = nn.Parameter(torch.linspace(-0.5, 0.5, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inner["odd"](self.inner["scale"](x)))
        h = torch.tanh(self.param_lin(self.inner["plain"](h)) + self.offset)
        return self.head(torch.tanh(self.normed(h)))


# name -> (builder, per-sample input shape)
MODELS = {
    "resnet": (resnet, (2, 4, 4)),
    "norms_mlp": (norms_mlp, (2, 4)),
    "decoder": (decoder, (2, 2, 2)),
    "nested": (Nested, (4,)),
    "embedding": (
        lambda: nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, NUM_OUT)),
        None,  # token inputs (N, 2)
    ),
}
CASES = [
    ("resnet", "ce-mean", "exact"),
    ("resnet", "mse-sum", "mc"),
    ("norms_mlp", "ce-sum", "empirical"),
    ("norms_mlp", "bce-mean", "exact"),
    ("decoder", "ce-mean", "mc"),
    ("decoder", "mse-mean", "empirical"),
    ("nested", "ce-mean", "empirical"),
    ("nested", "bce-sum", "mc"),
    ("nested", "mse-mean", "exact"),
    ("embedding", "ce-mean", "exact"),
]
DAMPINGS = [1e-3, 1e-1]
_PROBLEMS: dict = {}


def build(name: str, loss_name: str):
    """(model, loss, X, y) in float64 and eval mode, cached per session."""
    key = (name, loss_name)
    if key not in _PROBLEMS:
        builder, shape = MODELS[name]
        torch.manual_seed(7)
        model = _randomise_norms(builder().double()).eval()
        gen = torch.Generator().manual_seed(3)
        if shape is None:
            X = torch.randint(0, 7, (N, 2), generator=gen)
        else:
            X = torch.randn(N, *shape, generator=gen, dtype=torch.float64)
        y = make_targets(loss_name, N, gen=gen)
        _PROBLEMS[key] = (model, make_loss(loss_name), X, y, {})
    return _PROBLEMS[key]


def reference(name: str, loss_name: str, fisher: str, capt) -> Tensor:
    """The dense Fisher of the problem, independent of capture (except the MC labels)."""
    model, loss_fn, X, y, cache = build(name, loss_name)
    if fisher == "exact":
        if "ggn" not in cache:
            cache["ggn"] = R.dense_ggn(model, loss_fn, X, y)
        return cache["ggn"]
    if fisher == "empirical":
        return R.dense_empirical_fisher(model, loss_fn, X, y)
    return R.dense_fisher_from_columns(model, X, capt.columns, capt.scale)


def capture(name: str, loss_name: str, fisher: str):
    model, loss_fn, X, y, _ = build(name, loss_name)
    capt = curvlab.capture(model, loss_fn, X, y, fisher=fisher, generator=mc_generator(5))
    grad = R.batch_gradient(model, loss_fn, X, y)
    assert R.rel_err(capt.grad, grad) <= RTOL, "Capture.grad differs from autograd"
    return capt


def layer_slices(capt) -> list[slice]:
    return [lc.info.slice for lc in capt.layers]


@pytest.mark.parametrize("name,loss_name,fisher", CASES)
def test_exact_and_block_fisher(name, loss_name, fisher):
    """ExactFisher (incl. natural_gradient) and BlockDiagFisher: every member."""
    capt = capture(name, loss_name, fisher)
    F = reference(name, loss_name, fisher, capt)
    assert capt.num_params == F.shape[0]
    exact = curvlab.ExactFisher(capt)
    R.assert_close_all(R.interface_errors(exact, F, DAMPINGS), RTOL, f"ExactFisher {name}")
    for lam in DAMPINGS:
        expect = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), capt.grad)
        assert R.rel_err(curvlab.ExactFisher(capt).natural_gradient(lam), expect) <= RTOL
    D = torch.block_diag(*[F[s, s] for s in layer_slices(capt)])
    bd = curvlab.BlockDiagFisher(capt)
    R.assert_close_all(R.interface_errors(bd, D, DAMPINGS), RTOL, f"BlockDiagFisher {name}")
    expect = torch.linalg.solve(D + 0.1 * torch.eye(D.shape[0], dtype=D.dtype), capt.grad)
    assert R.rel_err(bd.natural_gradient(0.1), expect) <= RTOL


@pytest.mark.parametrize("name,loss_name,fisher", CASES[::2])
def test_approximations_use_exact_blocks_for_non_kronecker_layers(name, loss_name, fisher):
    """KFAC / EKFAC / FOOF: a layer without Kronecker factors gets its exact block
    (damped with λI), and ``layer_structure`` says so; Kronecker layers say
    ``"kronecker"``."""
    capt = capture(name, loss_name, fisher)
    F = reference(name, loss_name, fisher, capt)
    v = R.random_vector(F.shape[0])
    for cls in (curvlab.KFAC, curvlab.EKFAC, curvlab.FOOF):
        obj = cls(capt)
        structure = obj.layer_structure
        for lc in capt.layers:
            factored = lc.info.kronecker or lc.groups is not None  # grouped: per group
            want = "kronecker" if factored else "exact"
            assert structure[lc.name] == want, (cls.__name__, lc.name)
            if factored:
                continue
            s = lc.info.slice
            block = F[s, s]
            eye = torch.eye(block.shape[0], dtype=block.dtype)
            got = obj.solve(v, 0.1)[s]
            assert R.rel_err(got, torch.linalg.solve(block + 0.1 * eye, v[s])) <= RTOL
            assert R.rel_err(obj.blocks[lc.name].to_dense(), block) <= RTOL


def test_kinds_of_fixture_layers():
    """Which kind each module gets: subclasses that keep the computation are read as
    their parent; overriding subclasses, parametrised layers and raw parameters take the
    generic path; padded / transposed / 3-D convolutions are Kronecker ConvKinds, grouped
    ones (depthwise included) GroupedConvKinds."""

    def kinds(name: str) -> dict[str, str]:
        return {i.name: type(i).__name__ for i in find_layers(build(name, "ce-mean")[0])}

    nested = kinds("nested")
    assert nested["inner.plain"] == "LinearKind"
    for generic in ("inner.odd", "inner.scale", "param_lin", "normed", ""):
        assert nested[generic] == "GenericKind", generic
    assert kinds("resnet")["4"] == "GroupedConvKind"  # depthwise conv
    assert kinds("resnet")["3.bn1"] == "BatchNormKind"
    dec = kinds("decoder")
    assert [dec[k] for k in ("0", "1", "3", "5", "6", "8")] == [
        "GroupedConvKind",
        "GroupNormKind",
        "ConvKind",
        "ConvKind",
        "BatchNormKind",
        "ConvKind",
    ]
    assert set(kinds("norms_mlp").values()) == {
        "LinearKind",
        "LayerNormKind",
        "PReLUKind",
        "RMSNormKind",
        "BatchNormKind",
    }
    model = build("nested", "ce-mean")[0]
    param_lin = next(i for i in find_layers(model) if i.name == "param_lin")
    assert param_lin.params == [
        model.param_lin.bias,
        model.param_lin.parametrizations.weight.original,
    ]


def test_generic_refuses_coupled_samples():
    """A generic module whose single-sample outputs differ from its batch output
    (here dropout in train mode inside a custom module) is refused."""

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))
            self.drop = nn.Dropout(0.5)

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(x * self.w)

    model = nn.Sequential(Noisy(), nn.Linear(4, NUM_OUT).double())
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, NUM_OUT, (8,))
    with pytest.raises(UnsupportedModelError, match="couples samples"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")


def test_generic_memory_budget(monkeypatch):
    """Per-sample gradients above the memory budget: one error with the estimate and
    the ways out."""
    model = nn.Sequential(Scale(64), nn.Linear(64, NUM_OUT)).double()
    X, y = torch.randn(32, 64, dtype=torch.float64), torch.randint(0, NUM_OUT, (32,))
    monkeypatch.setattr(curvlab.config.options, "memory_budget", 10_000)
    with pytest.raises(MemoryBudgetError, match="smaller batch.*fisher='mc'.*freeze"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")


class _OwnAttention(nn.MultiheadAttention):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x, x, x)[0]


def test_multihead_attention_kind():
    """nn.MultiheadAttention: in-projection and out_proj layers when packed, one exact
    layer otherwise (tests/test_attention.py); a subclass with its own forward is refused
    with a curvlab error."""
    model = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))
    kinds = [(i.name, type(i).__name__) for i in find_layers(model)]
    assert kinds == [("0", "InProjectionKind"), ("0.out_proj", "OutProjectionKind")]
    model = nn.Sequential(nn.MultiheadAttention(4, 2, kdim=3, batch_first=True))
    assert [(i.name, type(i).__name__) for i in find_layers(model)] == [("0", "AttentionKind")]
    model = nn.Sequential(_OwnAttention(4, 2, batch_first=True), nn.Linear(4, 3))
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
    with pytest.raises(UnsupportedModelError, match="changes nn.MultiheadAttention"):
        curvlab.capture(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("method", ["kfac", "foof"])
def test_optimizers_step_with_exact_blocks(method):
    """One KFAC / FOOF optimizer step (no averaging) on norm and generic layers equals
    ``−lr`` times the curvature object's solve with the gradient."""
    import copy

    model, loss_fn, X, y, _ = build("nested" if method == "kfac" else "norms_mlp", "ce-mean")
    model = copy.deepcopy(model)
    fisher = "exact" if method == "kfac" else "empirical"
    capt = curvlab.capture(model, loss_fn, X, y, fisher=fisher)
    obj = curvlab.KFAC(capt) if method == "kfac" else curvlab.FOOF(capt)
    expect = -0.5 * obj.solve(capt.grad, 0.1)
    kw = {"fisher": fisher} if method == "kfac" else {}
    opt_cls = curvlab.optim.KFAC if method == "kfac" else curvlab.optim.FOOF
    opt = opt_cls(model, loss_fn, lr=0.5, damping=0.1, ema_decay=0.0, **kw)
    before = capt.params_vector()
    opt.step(X, y)
    after = torch.cat([p.detach().reshape(-1) for p in capt.params])
    assert R.rel_err(after - before, expect) <= RTOL

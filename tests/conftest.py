"""Shared fixtures: tiny float64 models, data for each loss, cached dense references.

Fixtures ``model_name``, ``loss_name`` and ``fisher`` are parametrised over every
case by default; a test narrows them with ``@pytest.mark.parametrize`` on the same
name (a direct parametrisation overrides the fixture's params).  ``problem`` builds
(model, loss, data) for the pair and caches it per session, together with its dense
references (``problem.ref(fisher, capt)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import reference as R
import torch
from torch import Tensor, nn

# The problems are tiny: intra-op threads only add overhead (10x on small einsums), and
# CI runs two pytest workers on two cores anyway.
torch.set_num_threads(1)

# ----------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------

NUM_OUT = 3


class MeanOverT(nn.Module):
    """``(N, T, C) -> (N, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _frozen_bn(num: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(num)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.requires_grad_(False)
    bn.eval()
    return bn


def _frozen(m: nn.Module) -> nn.Module:
    return m.requires_grad_(False)


def _frozen_bias_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    lin.bias.requires_grad_(False)
    return lin


# name -> (builder, per-sample input shape)
MODELS: dict[str, tuple] = {
    "mlp_tanh": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_OUT)), (4,)),
    "mlp_relu_nobias": (
        lambda: nn.Sequential(
            nn.Linear(4, 6, bias=False),
            nn.ReLU(),
            nn.Linear(6, 5, bias=False),
            nn.ReLU(),
            nn.Linear(5, NUM_OUT, bias=False),
        ),
        (4,),
    ),
    "mlp_mixed_bias": (
        lambda: nn.Sequential(
            nn.Linear(4, 5),
            nn.Sigmoid(),
            nn.Linear(5, 4, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(4, NUM_OUT),
        ),
        (4,),
    ),
    "seq_mean": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, NUM_OUT), MeanOverT()),
        (5, 3),
    ),
    "seq_flatten": (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 4, NUM_OUT)),
        (5, 3),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv1d(3, 2, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(2 * 4, NUM_OUT),
        ),
        (2, 8),
    ),
    "conv2d_stride": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, NUM_OUT),
        ),
        (2, 6, 6),
    ),
    "conv2d_same_dil": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same", dilation=2),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, bias=False),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, NUM_OUT),
        ),
        (2, 5, 5),
    ),
    "conv2d_nobias": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(2, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
            nn.Flatten(),
            nn.Linear(2 * 3 * 4, NUM_OUT, bias=False),
        ),
        (2, 5, 6),
    ),
    "frozen_bn": (
        lambda: nn.Sequential(nn.Linear(4, 5), _frozen_bn(5), nn.Tanh(), nn.Linear(5, NUM_OUT)),
        (4,),
    ),
    "frozen_linear": (
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), _frozen(nn.Linear(5, 5)), nn.Tanh(), nn.Linear(5, NUM_OUT)
        ),
        (4,),
    ),
    "frozen_bias": (
        lambda: nn.Sequential(_frozen_bias_linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_OUT)),
        (4,),
    ),
    "deep_linear": (
        lambda: nn.Sequential(
            nn.Linear(3, 4, bias=False),
            nn.Linear(4, 4, bias=False),
            nn.Linear(4, NUM_OUT, bias=False),
        ),
        (3,),
    ),
}
MODEL_NAMES = list(MODELS)
# Linear-only models with 2-D inputs (BackPACK, identities)
MLP_NAMES = ["mlp_tanh", "mlp_relu_nobias", "mlp_mixed_bias", "deep_linear"]
# Models curvlinops' KFAC/EKFAC accept (nn.Linear and nn.Conv2d layers only)
CURVLINOPS_KFAC_NAMES = [n for n in MODELS if n != "conv1d"]
CONV_NAMES = ["conv1d", "conv2d_stride", "conv2d_same_dil", "conv2d_nobias"]

LOSS_NAMES = ["ce-mean", "ce-sum", "mse-mean", "mse-sum", "bce-mean", "bce-sum"]
FISHERS = ["exact", "empirical", "mc"]
DAMPINGS = [1e-3, 1e-1, 10.0]
RTOL = 1e-8  # float64 relative tolerance for every comparison with a dense reference


def build_model(name: str, dtype: torch.dtype = torch.float64, seed: int | None = None):
    """Model ``name`` with deterministic random weights."""
    builder, in_shape = MODELS[name]
    torch.manual_seed(MODEL_NAMES.index(name) + 100 if seed is None else seed)
    model = builder().to(dtype)
    return model, in_shape


def make_loss(loss_name: str) -> nn.Module:
    kind, reduction = loss_name.split("-")
    cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[kind]
    return cls(reduction=reduction)


def make_targets(loss_name: str, n: int, dtype=torch.float64, gen=None) -> Tensor:
    kind = loss_name.split("-")[0]
    if kind == "ce":
        return torch.randint(0, NUM_OUT, (n,), generator=gen)
    if kind == "mse":
        return torch.randn(n, NUM_OUT, generator=gen, dtype=dtype)
    return torch.randint(0, 2, (n, NUM_OUT), generator=gen).to(dtype)


# ----------------------------------------------------------------------------------
# problems and their cached references
# ----------------------------------------------------------------------------------


class Ref:
    """Dense references for one (problem, Fisher kind[, sampled columns]).

    ``columns`` (C', N, C), ``scale`` and the per-layer ``records`` are built eagerly;
    the dense ``F`` (P x P) on first use.
    """

    def __init__(self, problem: Problem, columns: Tensor, dense=None):
        self.columns = columns
        self.scale = problem.scale
        self.records = R.layer_records(problem.model, problem.X, columns)
        self._problem, self._dense, self._F = problem, dense, None

    @property
    def F(self) -> Tensor:
        if self._F is None:
            p = self._problem
            self._F = (
                self._dense()
                if self._dense is not None
                else R.dense_fisher_from_columns(p.model, p.X, self.columns, self.scale)
            )
        return self._F


@dataclass(repr=False)
class Problem:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    _cache: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Problem({self.name})"

    @property
    def N(self) -> int:
        return self.X.shape[0]

    @property
    def P(self) -> int:
        return R.num_params(self.model)

    @property
    def scale(self) -> float:
        return R.reduction_scale(self.loss_fn, self.N)

    def capture(self, fisher: str = "exact", **kw):
        import curvlab

        return curvlab.capture(self.model, self.loss_fn, self.X, self.y, fisher=fisher, **kw)

    def output(self) -> Tensor:
        with torch.no_grad():
            return self.model(self.X)

    def grad(self) -> Tensor:
        if "grad" not in self._cache:
            self._cache["grad"] = R.batch_gradient(self.model, self.loss_fn, self.X, self.y)
        return self._cache["grad"]

    def ggn(self) -> Tensor:
        if "ggn" not in self._cache:
            self._cache["ggn"] = R.dense_ggn(self.model, self.loss_fn, self.X, self.y)
        return self._cache["ggn"]

    def ref(self, fisher: str, capt=None) -> Ref:
        """References for ``fisher``; ``mc`` uses the capture's sampled columns (cached
        by their exact values)."""
        if fisher == "mc":
            cols = capt.columns.detach().to(self.X.dtype)
            key = ("mc", tuple(cols.shape), cols.numpy().tobytes())
            if key not in self._cache:
                self._cache[key] = Ref(self, cols)
            return self._cache[key]
        if fisher not in self._cache:
            f = self.output()
            if fisher == "exact":
                cols = R.hessian_sqrt_columns(self.loss_fn, f, self.y)
                dense = self.ggn
            else:
                cols = R.empirical_columns(self.loss_fn, f, self.y)

                def dense():
                    return R.dense_empirical_fisher(self.model, self.loss_fn, self.X, self.y)

            self._cache[fisher] = Ref(self, cols, dense)
        return self._cache[fisher]


def build_problem(
    model_name: str,
    loss_name: str,
    n: int = 6,
    dtype: torch.dtype = torch.float64,
    repeat_input: bool = False,
    seed: int = 0,
) -> Problem:
    """A fresh problem; ``repeat_input`` uses one input (and one target) ``n`` times."""
    model, in_shape = build_model(model_name, dtype)
    gen = torch.Generator().manual_seed(1000 + seed + 7 * MODEL_NAMES.index(model_name))
    X = torch.randn(n, *in_shape, generator=gen, dtype=torch.float64)
    y = make_targets(loss_name, n, torch.float64, gen)
    if repeat_input:
        X = X[:1].expand(n, *in_shape).clone()
        y = y[:1].expand(n, *y.shape[1:]).clone()
    if y.dtype.is_floating_point:
        y = y.to(dtype)
    return Problem(f"{model_name}/{loss_name}", model, make_loss(loss_name), X.to(dtype), y)


_PROBLEMS: dict[tuple[str, str], Problem] = {}


def get_problem(model_name: str, loss_name: str) -> Problem:
    """Session-cached default problem (float64, N = 6)."""
    key = (model_name, loss_name)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = build_problem(model_name, loss_name)
    return _PROBLEMS[key]


@pytest.fixture(params=MODEL_NAMES)
def model_name(request) -> str:
    return request.param


@pytest.fixture(params=LOSS_NAMES)
def loss_name(request) -> str:
    return request.param


@pytest.fixture(params=FISHERS)
def fisher(request) -> str:
    return request.param


@pytest.fixture
def problem(model_name: str, loss_name: str) -> Problem:
    return get_problem(model_name, loss_name)


@pytest.fixture
def make_problem():
    """The uncached :func:`build_problem`, for variants (dtype, N, repeated inputs)."""
    return build_problem


def mc_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

"""Every error class of curvlab.errors, raised where the contract says."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build_problem, get_problem
from torch import nn

import curvlab
from curvlab import errors

OBJECTS = {
    "ExactFisher": curvlab.ExactFisher,
    "BlockDiagFisher": curvlab.BlockDiagFisher,
    "KFAC-standard": lambda c: curvlab.KFAC(c, damping_mode="standard"),
    "KFAC-heuristic": lambda c: curvlab.KFAC(c, damping_mode="heuristic"),
    "FOOF": curvlab.FOOF,
    "EKFAC": curvlab.EKFAC,
}


def _data(n=4, d=4, c=3):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randint(0, c, (n,), generator=g),
    )


def test_error_hierarchy():
    for cls in (
        errors.UnsupportedModelError,
        errors.ShapeError,
        errors.NonFiniteError,
        errors.SingularMatrixError,
        errors.MemoryBudgetError,
    ):
        assert issubclass(cls, errors.CurvlabError)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc(x))))


def test_frozen_layernorm_is_fine():
    model = WithNorm().double()
    model.norm.requires_grad_(False)
    X, y = _data()
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    assert capt.num_params == 25 + 18


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input(bad):
    p = get_problem("mlp_tanh", "ce-mean")
    X = p.X.clone()
    X[1, 2] = bad
    with pytest.raises(errors.NonFiniteError):
        curvlab.capture(p.model, p.loss_fn, X, p.y, fisher="exact")


def test_nonfinite_parameters_show_in_outputs():
    p = build_problem("mlp_tanh", "mse-mean")
    with torch.no_grad():
        p.model[2].weight[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError):
        curvlab.capture(p.model, p.loss_fn, p.X, p.y, fisher="exact")


class SqrtAbs(nn.Module):
    def forward(self, x):
        return x.abs().sqrt()


def test_nonfinite_gradients():
    """Finite outputs but NaN/Inf backpropagated gradients (d√|x|/dx at x = 0)."""
    model = nn.Sequential(nn.Linear(4, 5), SqrtAbs(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    X, y = _data()
    assert torch.isfinite(model(X)).all()
    with pytest.raises(errors.NonFiniteError):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")


def test_targets_wrong_batch_size():
    p = get_problem("mlp_tanh", "ce-mean")
    with pytest.raises(errors.ShapeError):
        curvlab.capture(p.model, p.loss_fn, p.X, p.y[:-1], fisher="exact")
    p = get_problem("mlp_tanh", "mse-sum")
    with pytest.raises(errors.ShapeError):
        curvlab.capture(p.model, p.loss_fn, p.X, p.y[:-2], fisher="mc")


def test_1d_output_is_a_shape_error():
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)).double()  # (N, 3) -> (N,)
    X = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    with pytest.raises(errors.ShapeError):
        curvlab.capture(model, nn.MSELoss(), X, y, fisher="exact")


def test_unknown_fisher_type():
    p = get_problem("mlp_tanh", "ce-mean")
    with pytest.raises(ValueError):
        p.capture("hessian")


def test_unsupported_loss():
    p = get_problem("mlp_tanh", "mse-mean")
    with pytest.raises(errors.CurvlabError):
        curvlab.capture(p.model, nn.L1Loss(), p.X, p.y, fisher="exact")


@pytest.mark.parametrize("name", list(OBJECTS))
def test_wrong_vector_length(name):
    p = get_problem("mlp_tanh", "ce-mean")
    obj = OBJECTS[name](p.capture("exact"))
    for v in (torch.zeros(p.P + 1, dtype=torch.float64), torch.zeros(1, p.P, dtype=torch.float64)):
        with pytest.raises(errors.ShapeError):
            obj.mv(v)
        with pytest.raises(errors.ShapeError):
            obj.solve(v, 0.1)


@pytest.mark.parametrize("name", list(OBJECTS))
def test_nonfinite_vector(name):
    p = get_problem("mlp_tanh", "ce-mean")
    obj = OBJECTS[name](p.capture("exact"))
    v = torch.zeros(p.P, dtype=torch.float64)
    v[0] = float("nan")
    with pytest.raises(errors.NonFiniteError):
        obj.mv(v)


@pytest.mark.parametrize("cls", ["ExactFisher", "BlockDiagFisher"])
def test_undamped_solve_on_rank_deficient_fisher(cls):
    p = get_problem("mlp_tanh", "ce-mean")  # P = 43 > N·C = 18
    obj = OBJECTS[cls](p.capture("exact"))
    with pytest.raises(errors.SingularMatrixError):
        obj.solve(torch.ones(p.P, dtype=torch.float64), 0.0)


def test_undamped_solve_on_singular_factors():
    """N·T < d_in + 1 makes A singular: KFAC-standard and FOOF cannot solve at λ = 0."""
    p = build_problem("mlp_tanh", "ce-mean", n=2)
    capt = p.capture("exact")
    v = torch.ones(p.P, dtype=torch.float64)
    for name in ("KFAC-standard", "FOOF", "EKFAC"):
        with pytest.raises(errors.SingularMatrixError):
            OBJECTS[name](capt).solve(v, 0.0)


@pytest.mark.parametrize("name", list(OBJECTS))
def test_negative_damping_rejected(name):
    p = get_problem("mlp_tanh", "ce-mean")
    obj = OBJECTS[name](p.capture("exact"))
    with pytest.raises(ValueError):
        obj.solve(torch.ones(p.P, dtype=torch.float64), -1.0)


def test_memory_budget_gram():
    """A budget below the Gram's size is refused with a message stating the estimate."""
    p = get_problem("conv2d_stride", "ce-mean")
    capt = p.capture("exact")  # N·C' = 18 Gram rows
    with pytest.raises(errors.MemoryBudgetError) as info:
        curvlab.ExactFisher(capt, memory_budget=100)
    msg = str(info.value)
    assert "18" in msg
    # the estimate is a legible, non-zero size (e.g. "7.6 KiB" or "7776 bytes", not "0.00 GiB")
    sizes = re.findall(r"(\d+(?:\.\d+)?)\s*(bytes|B|KiB|MiB|GiB|kB|KB|MB|GB)\b", msg)
    assert any(float(x) > 0 for x, _ in sizes), f"no non-zero size estimate in: {msg}"
    with pytest.raises(errors.MemoryBudgetError):
        curvlab.BlockDiagFisher(capt, memory_budget=100)


def test_memory_budget_to_dense(monkeypatch):
    p = get_problem("conv2d_stride", "ce-mean")
    capt = p.capture("exact")
    monkeypatch.setattr(curvlab.config.options, "memory_budget", 1000)
    for make in OBJECTS.values():
        try:
            obj = make(capt)
        except errors.MemoryBudgetError:
            continue  # Gram-based objects refuse at construction under this budget
        with pytest.raises(errors.MemoryBudgetError):
            obj.to_dense()


def test_non_finite_kronecker_factor_is_named():
    from curvlab.curvature.factors import Eigen

    m = torch.eye(3, dtype=torch.float64)
    m[0, 1] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="input factor A of layer '2'"):
        Eigen.of(m, "the input factor A of layer '2'")

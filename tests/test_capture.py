"""capture(): gradient, loss, scale, Fisher columns and per-layer records vs references.

Tolerance: relative error ≤ RTOL = 1e-8 in float64 (conftest.RTOL).
"""

from __future__ import annotations

import math

import pytest
import reference as R
import torch
from conftest import RTOL, get_problem, mc_generator
from torch import nn

import curvlab


def test_grad_loss_scale(problem):
    capt = problem.capture("exact")
    assert capt.num_params == problem.P
    assert capt.grad.shape == (problem.P,)
    err = R.rel_err(capt.grad, problem.grad())
    assert err <= RTOL
    loss = problem.loss_fn(problem.output(), problem.y)
    assert isinstance(capt.loss, float)
    assert abs(capt.loss - float(loss)) <= RTOL * abs(float(loss))
    assert capt.scale == pytest.approx(problem.scale, rel=1e-15)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_grad_independent_of_fisher_type(problem, fisher):
    capt = problem.capture(fisher, generator=mc_generator(0))
    err = R.rel_err(capt.grad, problem.grad())
    assert err <= RTOL


def test_exact_columns_square_root_of_hessian(problem):
    """Σ_c g_nc g_ncᵀ = ∇²_f ℓ̃_n (any square root is fine), C columns."""
    capt = problem.capture("exact")
    f = problem.output()
    C = f.shape[1]
    assert capt.columns.shape == (C, problem.N, C)
    H = R.per_sample_output_hessians(problem.loss_fn, f, problem.y)
    HH = torch.einsum("knc,knd->ncd", capt.columns, capt.columns)
    err = R.rel_err(HH, H)
    assert err <= RTOL


def test_empirical_columns(problem):
    """Empirical columns = √c ∇_f ℓ_n at the data labels (curvlinops EF convention)."""
    capt = problem.capture("empirical")
    ref = R.empirical_columns(problem.loss_fn, problem.output(), problem.y)
    assert capt.columns.shape == ref.shape
    err = R.rel_err(capt.columns, ref)
    assert err <= RTOL


@pytest.mark.parametrize("model_name", ["mlp_tanh"])
@pytest.mark.parametrize("mc_samples", [1, 4])
def test_mc_columns_structure(problem, loss_name, mc_samples):
    """Each MC column is √(c/S) ∇_f ℓ_sum(f, ŷ) for some label ŷ in the model's support."""
    capt = problem.capture("mc", mc_samples=mc_samples, generator=mc_generator(3))
    f = problem.output()
    N, C = f.shape
    assert capt.columns.shape == (mc_samples, N, C)
    c = R.output_scale(problem.loss_fn, C)
    g = capt.columns * (mc_samples / c) ** 0.5  # ∇_f ℓ_sum(f, ŷ)
    kind = loss_name.split("-")[0]
    if kind == "ce":  # g = p - onehot(ŷ)
        onehot = f.softmax(1) - g
        assert torch.allclose(onehot.sum(-1), torch.ones(mc_samples, N, dtype=f.dtype))
        assert torch.allclose(onehot.max(-1).values, torch.ones(mc_samples, N, dtype=f.dtype))
    elif kind == "bce":  # g = σ(f) - ŷ with ŷ ∈ {0, 1}
        yhat = f.sigmoid() - g
        assert torch.allclose(yhat, yhat.round(), atol=1e-12)
    else:  # g = 2 (f - ŷ), ŷ ~ N(f, 1/2): finite, not all equal
        assert torch.isfinite(g).all() and g.std() > 0


@pytest.mark.parametrize("model_name", ["mlp_tanh"])
def test_mc_reproducible_with_generator(problem):
    c1 = problem.capture("mc", mc_samples=2, generator=mc_generator(7)).columns
    c2 = problem.capture("mc", mc_samples=2, generator=mc_generator(7)).columns
    c3 = problem.capture("mc", mc_samples=2, generator=mc_generator(8)).columns
    assert torch.equal(c1, c2)
    assert not torch.equal(c1, c3)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_layer_records(problem, fisher):
    """`a` equals hook-captured inputs/patches; `e` equals autograd output gradients of
    the capture's own columns (so any square root / any MC draw is checked exactly)."""
    capt = problem.capture(fisher, mc_samples=2, generator=mc_generator(1))
    refs = R.layer_records(problem.model, problem.X, capt.columns)
    assert [lc.name for lc in capt.layers] == [r.name for r in refs]
    for lc, r in zip(capt.layers, refs):
        assert lc.a.shape == r.a.shape, lc.name
        assert lc.e.shape == r.e.shape, lc.name
        err = R.rel_err(lc.a, r.a)
        assert err <= RTOL, lc.name
        err = R.rel_err(lc.e, r.e)
        assert err <= RTOL, lc.name


def test_capture_leaves_model_untouched(problem):
    model = problem.model
    before = [p.detach().clone() for p in model.parameters()]
    training = [m.training for m in model.modules()]
    problem.capture("mc", generator=mc_generator(0))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert training == [m.training for m in model.modules()]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_frozen_parameters_excluded():
    """Flat layout = trainable params of supported layers, model.parameters() order."""
    for name in ["frozen_bn", "frozen_linear", "frozen_bias"]:
        p = get_problem(name, "ce-mean")
        capt = p.capture("exact")
        assert capt.num_params == p.P
        trainable = [q for q in p.model.parameters() if q.requires_grad]
        assert capt.num_params == sum(q.numel() for q in trainable)
        err = R.rel_err(capt.grad, p.grad())
        assert err <= RTOL


def test_frozen_bias_has_no_homogeneous_column():
    p = get_problem("frozen_bias", "mse-sum")
    capt = p.capture("exact")
    first = capt.layers[0]
    assert first.a.shape[-1] == 4  # d_in, no trailing 1
    assert capt.layers[1].a.shape[-1] == 6  # 5 + bias


def test_linear_sequence_input_shapes():
    p = get_problem("seq_mean", "ce-sum")
    capt = p.capture("exact")
    assert capt.layers[0].a.shape == (p.N, 5, 4)  # T = 5, d_in + 1
    assert capt.layers[0].e.shape == (3, p.N, 5, 4)


def test_conv_patch_shapes():
    p = get_problem("conv2d_stride", "ce-mean")
    capt = p.capture("exact")
    assert capt.layers[0].a.shape == (p.N, 9, 2 * 9 + 1)
    assert capt.layers[0].e.shape == (3, p.N, 9, 3)


def test_ce_probability_targets():
    """CrossEntropyLoss with probability targets (N, C) also captures a correct gradient."""
    p = get_problem("mlp_tanh", "ce-mean")
    probs = torch.softmax(torch.randn(p.N, 3, generator=mc_generator(2), dtype=p.X.dtype), 1)
    capt = curvlab.capture(p.model, p.loss_fn, p.X, probs, fisher="empirical")
    ref = R.batch_gradient(p.model, p.loss_fn, p.X, probs)
    err = R.rel_err(capt.grad, ref)
    assert err <= RTOL
    cols = R.empirical_columns(p.loss_fn, p.output(), probs)
    err = R.rel_err(capt.columns, cols)
    assert err <= RTOL


def test_model_in_eval_mode_dropout_free():
    """A parameter-free module between layers (Dropout in eval mode) is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.eval()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    err = R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, y))
    assert err <= RTOL


def test_gradient_rows(problem):
    """`g` equals the autograd output gradients of ∂L/∂f, and Σ_nt g_nt ā_ntᵀ is the
    mini-batch gradient; `gradient=False` leaves `grad` out and changes nothing else."""
    f = problem.output().requires_grad_()
    (grad_output,) = torch.autograd.grad(problem.loss_fn(f, problem.y), f)
    refs = R.layer_records(problem.model, problem.X, grad_output.unsqueeze(0))
    capt = problem.capture("exact")
    lean = problem.capture("exact", gradient=False)
    assert lean.grad is None
    assert lean.device == capt.device and lean.dtype == capt.dtype
    for lc, ln, r in zip(capt.layers, lean.layers, refs):
        assert lc.g.shape == r.e[0].shape, lc.name
        assert R.rel_err(lc.g, r.e[0]) <= RTOL, lc.name
        assert torch.equal(ln.g, lc.g) and torch.equal(ln.e, lc.e), lc.name
    grad = capt.join({lc.name: torch.einsum("nto,ntk->ok", lc.g, lc.a) for lc in capt.layers})
    assert R.rel_err(grad, problem.grad()) <= RTOL


def test_output_locations_are_recorded():
    """``locations`` is the output's location shape (its product is ``T``)."""
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3, stride=2),
        torch.nn.Flatten(start_dim=2),
        torch.nn.Linear(4, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 2),
    ).double()
    X, y = torch.randn(5, 2, 9, dtype=torch.float64), torch.randint(0, 2, (5,))
    capt = curvlab.capture(model, torch.nn.CrossEntropyLoss(), X, y, fisher="exact")
    assert [lc.locations for lc in capt.layers] == [(4,), (3,), ()]
    assert all(lc.a.shape[1] == math.prod(lc.locations) for lc in capt.layers)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 0), bias=False),
        nn.Conv2d(3, 4, 3, padding="same", dilation=2),
        nn.Conv2d(3, 4, (2, 4), padding="same"),
        nn.Conv2d(3, 4, 2, padding="valid", stride=3),
        nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2),
        nn.Conv1d(3, 4, 4, padding="same", bias=False),
    ],
    ids=repr,
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_unfold_matches_im2col(conv, channels_last):
    """Patch rows equal torch's im2col (``F.unfold``, the bias column appended), for
    strides, dilations, asymmetric and 'same'/'valid' padding and strided inputs."""
    import torch.nn.functional as F

    from curvlab.layers import find_layers

    one_d = isinstance(conv, nn.Conv1d)
    x = torch.randn(5, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if one_d:
        x = x[:, :, 0]
    conv = conv.double()
    (info,) = find_layers(conv)
    x2 = x.unsqueeze(-2) if one_d else x
    kernel = (1, *conv.kernel_size) if one_d else conv.kernel_size
    dilation = (1, *conv.dilation) if one_d else conv.dilation
    stride = (1, *conv.stride) if one_d else conv.stride
    if isinstance(conv.padding, str):
        pads = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1) if conv.padding == "same" else 0
            pads += [total // 2, total - total // 2]
        x2, padding = F.pad(x2, pads), 0
    else:
        padding = (0, *conv.padding) if one_d else conv.padding
    cols = F.unfold(x2, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if conv.bias is not None:
        cols = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=cols.dtype)], dim=-1)
    got = info.unfold(x)
    assert got.shape == cols.shape
    assert torch.equal(got, cols)
    # the rows reproduce the layer: W̄ ā = conv(x) at every output location
    out = conv(x).flatten(2).transpose(1, 2)
    w_bar = info.to_matrix(torch.cat([p.detach().reshape(-1) for p in conv.parameters()]))
    assert torch.allclose(got @ w_bar.T, out, rtol=1e-12, atol=1e-12)


def test_forward_hooks_that_change_a_layer_output():
    """A user's forward hook that rescales a captured layer's output (returned or in
    place) is part of the model downstream of the layer: the gradient and the exact
    Fisher follow the model with its hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].register_forward_hook(lambda m, args, out: 2 * out)
    model[2].register_forward_hook(lambda m, args, out: out.mul_(0.5))
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, y)) <= RTOL
    dense = R.dense_ggn(model, loss_fn, X, y)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), dense) <= RTOL


class _AddInPlace(nn.Module):
    def forward(self, x):
        return x.add_(0.25)


class _ScaleAsView(nn.Module):
    """A module read through the generic path whose output is a view (flattened)."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return (x * self.w).view(x.shape[0], -1)


class _Scale(nn.Module):
    """A module read through the generic path (it compares its outputs with the batch's)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


def test_in_place_operations_downstream_of_layer_outputs():
    """Layer outputs changed in place downstream (ReLU(inplace=True), in-place adds, on a
    view output of a generic module, on the output of a module whose outputs the capture
    compares) leave the gradient, the records and the exact Fisher equal to the
    references of the same model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 2, 3, bias=False),
        _AddInPlace(),
        _ScaleAsView((2, 3, 3)),
        nn.ReLU(inplace=True),
        nn.Linear(18, 5),
        _AddInPlace(),
        _Scale(5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 3),
    ).double()
    for p in model[1].parameters():  # BatchNorm with non-trivial running statistics
        p.data.uniform_(0.5, 1.5)
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 1.5)
    model.eval()
    X, y = torch.randn(7, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, y)) <= RTOL
    dense = R.dense_ggn(model, loss_fn, X, y)
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), dense) <= RTOL

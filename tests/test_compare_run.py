"""``curvlab.compare.compare``: one capture, untouched models, progress, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import get_problem
from torch import nn

import curvlab.compare.analysis as analysis_module
from curvlab.compare import (
    SECTIONS,
    Analysis,
    compare,
    loss_at,
    progress_records,
    relative_errors,
)
from curvlab.compare.progress import rescale_per_layer
from curvlab.records import NETWORK, Record

FAST = dict(damping=(0.1,), lrs=(0.1, 1.0), progress=False, top_k=3)


def _problem(name="conv2d_stride", loss="ce-mean"):
    p = get_problem(name, loss)
    return p.model, p.loss_fn, p.X, p.y


def test_every_section_from_one_capture(monkeypatch):
    calls = []
    real = analysis_module.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis_module, "capture", counting)
    records = compare(*_problem(), **FAST)
    assert len(calls) == 1
    assert list(dict.fromkeys(r.section for r in records)) == list(SECTIONS)
    assert all(isinstance(r, Record) and isinstance(r.value, float) for r in records)
    assert all(math.isfinite(r.value) for r in records if r.section != "progress")


def test_model_is_left_unchanged():
    model, loss_fn, X, y = _problem("frozen_bn")
    before = copy.deepcopy(model.state_dict())
    compare(model, loss_fn, X, y, **FAST)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


class CountingTanh(nn.Module):
    """Tanh with a buffer that every forward pass updates (as train-mode BatchNorm's
    running statistics, without coupling the samples, which the comparison refuses)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(x)


def test_loss_at_matches_a_shifted_copy_and_keeps_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), CountingTanh(), nn.Linear(5, 3))
    model = model.double().train()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    analysis = Analysis(model, nn.CrossEntropyLoss(), X, y, "exact")
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    step = torch.randn(analysis.capture.num_params, dtype=torch.float64)
    value = loss_at(analysis, step)
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(
                [p for p in shifted.parameters() if p.requires_grad]
            )
            - step,
            [p for p in shifted.parameters() if p.requires_grad],
        )
        expect = float(nn.CrossEntropyLoss()(shifted(X), y))
    assert abs(value - expect) <= 1e-12


def test_progress_records():
    model, loss_fn, X, y = _problem()
    analysis = Analysis(model, loss_fn, X, y, "exact")
    lrs = (0.01, 0.1, 1.0)
    records = progress_records(analysis, ["exact", "kfac", "foof", "sgd"], [0.1], lrs, "kfac")
    with torch.no_grad():
        base = float(loss_fn(model(X), y))
    for r in records:
        d = analysis.direction(r.method, 0.1)
        if r.reference is not None:
            d = rescale_per_layer(analysis, d, analysis.direction(r.reference, 0.1))
        if r.metric == "relative_loss_decrease":
            expect = (base - loss_at(analysis, r.extra["lr"] * d)) / base
            assert abs(r.value - expect) <= 1e-12
        else:
            same = [
                x.value
                for x in records
                if x.metric == "relative_loss_decrease"
                and (x.method, x.reference) == (r.method, r.reference)
            ]
            assert r.value == max(same)
    sgd_best = next(
        r for r in records if r.method == "sgd" and r.reference is None and "best" in r.metric
    )
    assert sgd_best.value > 0  # a small gradient step decreases the loss


def test_rescaled_steps_have_the_reference_norms_per_layer():
    model, loss_fn, X, y = _problem()
    analysis = Analysis(model, loss_fn, X, y, "exact")
    d, ref = analysis.direction("foof", 0.1), analysis.direction("kfac", 0.1)
    out = rescale_per_layer(analysis, d, ref)
    for lc in analysis.capture.layers:
        s = lc.info.slice
        assert torch.isclose(out[s].norm(), ref[s].norm(), rtol=1e-12)
        cos = out[s] @ d[s] / (out[s].norm() * d[s].norm())
        assert abs(float(cos) - 1.0) <= 1e-12


def test_reference_is_added_and_mc_is_reproducible():
    model, loss_fn, X, y = _problem("mlp_tanh")
    kw = dict(FAST, methods=["kfac"], sections=["cosine"], fisher="mc", seed=3)
    first, second = compare(model, loss_fn, X, y, **kw), compare(model, loss_fn, X, y, **kw)
    assert {r.method for r in first} == {"exact", "kfac"}
    assert [r.value for r in first] == [r.value for r in second]
    other = compare(model, loss_fn, X, y, **dict(kw, seed=4))
    assert [r.value for r in first] != [r.value for r in other]


def test_sections_subset_and_order():
    records = compare(*_problem("mlp_tanh"), sections=["damping", "cosine"], **FAST)
    assert list(dict.fromkeys(r.section for r in records)) == ["cosine", "damping"]
    layers = {r.layer for r in records if r.section == "cosine"}
    assert NETWORK in layers and len(layers) == 3


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(methods=["kfac", "nope"]), "unknown method 'nope'; choose from exact, blockdiag"),
        (dict(reference="nope"), "unknown method 'nope'"),
        (dict(sections=["cosine", "nope"]), "unknown section 'nope'; choose from cosine"),
        (dict(damping=(0.1, 0.0)), "every damping must be a finite number > 0"),
        (dict(damping=(float("nan"),)), "bad damping nan"),
        (dict(damping=()), "no damping given"),
        (dict(lrs=(-1.0,)), "every learning rate must be a finite number > 0"),
        (dict(inner_products=["sgd"]), "unknown inner product 'sgd'; choose from exact"),
        (dict(rescale_to="nope"), "unknown method 'nope'"),
        (dict(top_k=0), "top_k must be a positive integer"),
    ],
)
def test_invalid_options(kwargs, message):
    options = dict(FAST, **kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compare(*_problem("mlp_tanh"), **options)


def test_kfac_variants_on_linear_layers():
    """'reduce' equals 'expand' without spatial dimensions; BackPACK's KFLR equals KFAC
    for bias-free Linear layers (it keeps weight and bias apart)."""
    pytest.importorskip("backpack")
    model, loss_fn, X, y = _problem("mlp_relu_nobias")
    analysis = Analysis(model, loss_fn, X, y, "exact")
    kfac = relative_errors(analysis, "kfac")
    for variant in ("kfac-reduce", "kfac-backpack"):
        other = relative_errors(analysis, variant)
        for layer, (err, cos) in kfac.items():
            assert abs(other[layer][0] - err) <= 1e-9 and abs(other[layer][1] - cos) <= 1e-9
        d, ref = analysis.direction(variant, 0.1), analysis.direction("kfac", 0.1)
        assert torch.allclose(d, ref, rtol=1e-9, atol=1e-12)


def test_kfac_backpack_needs_a_fisher_backpack_has():
    model, loss_fn, X, y = _problem("mlp_relu_nobias")
    with pytest.raises(ValueError, match="kfac-backpack needs fisher 'exact'"):
        compare(model, loss_fn, X, y, methods=["kfac-backpack"], fisher="empirical", **FAST)


def test_the_package_is_callable():
    import curvlab.compare as package
    import curvlab.compare.errors as errors_module

    options = dict(FAST, sections=["cosine"], methods=["kfac"])
    got = package(*_problem("mlp_tanh"), **options)
    assert [r.value for r in got] == [r.value for r in compare(*_problem("mlp_tanh"), **options)]
    assert errors_module.relative_errors is relative_errors

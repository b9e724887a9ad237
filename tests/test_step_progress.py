"""Progress per update along KFAC's own trajectory (Benzing 2022, Fig. 4C).

The records must measure the step the KFAC optimizer took (moving-average factors, MC
Fisher): here that step is recomputed by hand in float64 from a twin optimizer's state
(its factors in use) and dense formulas, ``Δ_l = lr (Ĝ + √λ/π I)⁻¹ ∇W (Â + π√λ I)⁻¹``,
and FOOF's direction ``∇W (Â + π√λ I)⁻¹`` rescaled per layer to ``‖Δ_l‖``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import RTOL, build_problem, mc_generator
from torch import nn
from torch.func import functional_call

from curvlab.compare.step_progress import step_progress, step_progress_summary
from curvlab.optim import KFAC
from curvlab.plots import plot_step_progress
from curvlab.records import Record

LR, LAM, DECAY = 0.3, 0.05, 0.9


def _layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _wb(flat: torch.Tensor, layer: nn.Linear, offset: int) -> tuple[torch.Tensor, int]:
    """The layer's ``[W | b]`` matrix from the flat vector at ``offset`` and the next offset."""
    o, i = layer.weight.shape
    w = flat[offset : offset + o * i].reshape(o, i)
    offset += o * i
    if layer.bias is None:
        return w, offset
    return torch.cat([w, flat[offset : offset + o].reshape(o, 1)], dim=1), offset + o


def _flat(mats: list[torch.Tensor], layers: list[nn.Linear]) -> torch.Tensor:
    parts = []
    for m, layer in zip(mats, layers):
        i = layer.weight.shape[1]
        parts += [m[:, :i].reshape(-1)] + ([m[:, i]] if layer.bias is not None else [])
    return torch.cat(parts)


def _loss(model, loss_fn, theta, x, y) -> float:
    names = [n for n, p in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    values = dict(zip(names, theta.split(sizes)))
    state = {n: v.view_as(p) for (n, p), v in zip(model.named_parameters(), values.values())}
    with torch.no_grad():
        return float(loss_fn(functional_call(model, state, (x,)), y))


def _batches(n: int):
    return [(p.X, p.y) for p in (build_problem("mlp_tanh", "ce-mean", seed=j) for j in range(n))]


def test_progress_uses_the_step_the_optimizer_took():
    prob = build_problem("mlp_tanh", "ce-mean")
    kwargs = dict(lr=LR, damping=LAM, ema_decay=DECAY, fisher="mc")
    opt = KFAC(copy.deepcopy(prob.model), prob.loss_fn, generator=mc_generator(3), **kwargs)
    twin = KFAC(copy.deepcopy(prob.model), prob.loss_fn, generator=mc_generator(3), **kwargs)
    batches = _batches(5)
    records = step_progress(opt, batches, every=2, methods=("foof-kfac-damping", "foof", "sgd"))
    assert sorted({r.index for r in records}) == [0, 2, 4]
    layers = _layers(twin.model)
    for k, (x, y) in enumerate(batches):
        theta = torch.cat([p.detach().reshape(-1) for p in twin.model.parameters()])
        loss = prob.loss_fn(twin.model(x), y)
        g = torch.cat(
            [t.reshape(-1) for t in torch.autograd.grad(loss, list(twin.model.parameters()))]
        )
        twin.step(x, y)
        if k % 2:
            continue
        kfac, foof, plain = [], [], []
        offset = 0
        for layer, f in zip(layers, twin.factors.values()):
            V, offset = _wb(g, layer, offset)
            A, G = f.A, f.G
            pi = math.sqrt(float((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])))
            IA, IG = torch.eye(A.shape[0], dtype=A.dtype), torch.eye(G.shape[0], dtype=G.dtype)
            step = LR * torch.linalg.inv(G + math.sqrt(LAM) / pi * IG) @ V
            step = step @ torch.linalg.inv(A + pi * math.sqrt(LAM) * IA)
            kfac.append(step)
            for out, damped in ((foof, A + pi * math.sqrt(LAM) * IA), (plain, A + LAM * IA)):
                d = V @ torch.linalg.inv(damped)
                out.append(d * step.norm() / d.norm())
        sgd = []
        offset = 0
        for layer, step in zip(layers, kfac):
            V, offset = _wb(g, layer, offset)
            sgd.append(V * step.norm() / V.norm())
        base = float(loss.detach())
        at_k = {r.method: r.value for r in records if r.index == k}
        for method, mats in (
            ("kfac", kfac),
            ("foof-kfac-damping", foof),
            ("foof", plain),
            ("sgd", sgd),
        ):
            shifted = _loss(twin.model, prob.loss_fn, theta - _flat(mats, layers), x, y)
            expect = (base - shifted) / base
            assert abs(at_k[method] - expect) <= RTOL * max(abs(expect), 1e-3), (k, method)
    # the optimizer was driven through every batch, as its twin
    for p, q in zip(opt.model.parameters(), twin.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_summary():
    rows = [
        Record("step_progress", "relative_loss_decrease", m, v, reference="kfac", index=k)
        for k, (a, b) in enumerate([(0.1, 0.2), (0.2, 0.1), (0.3, 0.3), (-0.1, 0.1)])
        for m, v in (("kfac", a), ("foof", b))
    ]
    got = {r.metric: r.value for r in step_progress_summary(rows) if r.method == "foof"}
    assert got["median_ratio"] == pytest.approx(1.0)  # ratios 2, 0.5, 1 (kfac ≤ 0 skipped)
    assert got["fraction_ahead"] == 0.5 and got["fraction_behind"] == 0.25
    assert got["checkpoints"] == 4


def test_bad_arguments():
    prob = build_problem("mlp_tanh", "ce-mean")
    opt = KFAC(prob.model, prob.loss_fn)
    with pytest.raises(ValueError, match="every must be"):
        step_progress(opt, [], every=0)
    with pytest.raises(ValueError, match="choose from foof-kfac-damping"):
        step_progress(opt, [], methods=("exact",))


def test_plot_shows_the_ratio_and_its_median():
    rows = [
        Record("step_progress", "relative_loss_decrease", m, v, reference="kfac", index=k)
        for k, (a, b) in enumerate([(0.1, 0.2), (0.2, 0.1), (0.3, 0.3)])
        for m, v in (("kfac", a), ("foof-kfac-damping", b))
    ]
    fig = plot_step_progress(rows)
    (line,) = fig.axes[1].get_lines()[:1]
    assert list(line.get_ydata()) == pytest.approx([2.0, 0.5, 1.0])
    assert "median 1" in line.get_label()
    with pytest.raises(ValueError, match="reference method 'exact'"):
        plot_step_progress(rows, reference="exact")

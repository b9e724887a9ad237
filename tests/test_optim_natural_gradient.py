"""NaturalGradient: one step is ``−lr · (F + λI)⁻¹ g`` of the capture's exact Fisher.

The reference is :class:`curvlab.ExactFisher` / :class:`curvlab.BlockDiagFisher` on a
capture at the same parameters (same MC seed), whose solves are themselves tested
against dense float64 matrices.  Tolerance: relative 1e-10 in float64.
"""

from __future__ import annotations

import copy

import pytest
import reference as R
import torch
from conftest import build_problem, mc_generator

import curvlab
from curvlab.optim import NaturalGradient

TOL = 1e-10


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("structure", ["full", "block_diagonal"])
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
@pytest.mark.parametrize(
    "model_name, loss_name", [("mlp_mixed_bias", "ce-mean"), ("conv2d_stride", "mse-sum")]
)
def test_step_equals_solve(model_name, loss_name, fisher, structure):
    prob = build_problem(model_name, loss_name)
    lr, lam = 0.7, 0.05
    capt = prob.capture(fisher, generator=mc_generator(3))
    kind = curvlab.ExactFisher if structure == "full" else curvlab.BlockDiagFisher
    expect = -lr * kind(capt).solve(capt.grad, lam)

    model = copy.deepcopy(prob.model)
    before = flat_params(model)
    opt = NaturalGradient(
        model,
        prob.loss_fn,
        lr=lr,
        damping=lam,
        fisher=fisher,
        structure=structure,
        generator=mc_generator(3),
    )
    loss = opt.step(prob.X, prob.y)
    assert loss == pytest.approx(capt.loss, rel=1e-12)
    assert R.rel_err(flat_params(model) - before, expect) < TOL


def test_independent_curvature_batch():
    """Gradient from batch 1, Fisher from batch 2 (Benzing 2022, App. I.5)."""
    first = build_problem("mlp_tanh", "ce-mean", n=6, seed=0)
    second = build_problem("mlp_tanh", "ce-mean", n=9, seed=1)
    lam = 0.1
    grad = first.capture("exact").grad
    expect = -curvlab.ExactFisher(second.capture("exact")).solve(grad, lam)

    model = copy.deepcopy(first.model)
    before = flat_params(model)
    opt = NaturalGradient(model, first.loss_fn, lr=1.0, damping=lam, fisher="exact")
    loss = opt.step(first.X, first.y, curvature_batch=(second.X, second.y))
    assert loss == pytest.approx(first.capture("exact").loss, rel=1e-12)
    assert R.rel_err(flat_params(model) - before, expect) < TOL
    # not the same-batch direction
    same = -curvlab.ExactFisher(first.capture("exact")).solve(grad, lam)
    assert R.rel_err(expect, same) > 1e-3

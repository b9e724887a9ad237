"""The update every curvlab optimizer shares (curvlab/optim/base.py).

* weight decay and heavy-ball momentum act on the preconditioned direction exactly as
  SGD does on the gradient (two-step reference with the exact natural gradient);
* hyperparameters are read from ``param_groups`` at each step (lr schedulers work);
* ``state_dict``/``load_state_dict`` resume a run exactly, and keep float64 statistics
  of a float32 model in float64;
* invalid arguments are refused.
"""

from __future__ import annotations

import copy

import pytest
import reference as R
import torch
from conftest import build_problem
from torch import nn

import curvlab
from curvlab.optim import FOOF, KFAC, SINGD, NaturalGradient, TwoLevelKFAC


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def test_momentum_and_weight_decay():
    prob = build_problem("mlp_tanh", "ce-mean")
    lr, lam, mu, wd = 0.3, 0.1, 0.8, 0.01
    model = copy.deepcopy(prob.model)
    opt = NaturalGradient(
        model, prob.loss_fn, lr=lr, damping=lam, fisher="exact", momentum=mu, weight_decay=wd
    )
    ref = copy.deepcopy(prob.model)
    theta = flat_params(ref)
    buf = None
    for _ in range(2):
        capt = curvlab.capture(ref, prob.loss_fn, prob.X, prob.y, fisher="exact")
        d = curvlab.ExactFisher(capt).solve(capt.grad, lam) + wd * theta
        buf = d if buf is None else mu * buf + d
        theta = theta - lr * buf
        torch.nn.utils.vector_to_parameters(theta, ref.parameters())
        opt.step(prob.X, prob.y)
    assert R.rel_err(flat_params(model), theta) < 1e-12


def test_learning_rate_from_param_groups():
    prob = build_problem("mlp_tanh", "mse-mean")
    model = copy.deepcopy(prob.model)
    opt = KFAC(model, prob.loss_fn, lr=0.5, damping=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(prob.X, prob.y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    opt.param_groups[0]["lr"] = 0.0
    before = flat_params(model)
    opt.step(prob.X, prob.y)
    assert torch.equal(flat_params(model), before)
    assert opt.steps == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda m, f: KFAC(m, f, damping=0.1, inverse_every=2, momentum=0.9, fisher="exact"),
        lambda m, f: FOOF(m, f, damping=0.1, inverse_every=3, stats_steps=2),
        lambda m, f: TwoLevelKFAC(m, f, damping=0.1, fisher="exact", kl_clip=1e-3),
        lambda m, f: SINGD(m, f, update_rule="ingd", structure="diagonal", momentum=0.5),
        lambda m, f: NaturalGradient(m, f, damping=0.1, fisher="exact", momentum=0.5),
    ],
    ids=["kfac", "foof", "two_level", "singd", "ng"],
)
def test_state_dict_resumes_exactly(make):
    prob = build_problem("mlp_mixed_bias", "ce-mean", dtype=torch.float32)
    model = copy.deepcopy(prob.model)
    opt = make(model, prob.loss_fn)
    for _ in range(3):
        opt.step(prob.X, prob.y)
    saved_model, saved_opt = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(prob.X, prob.y)

    resumed = make(saved_model, prob.loss_fn)
    resumed.load_state_dict(saved_opt)
    if hasattr(resumed, "statistics"):
        assert all(v.dtype == torch.float64 for v in resumed.statistics.values())
    for _ in range(3):
        resumed.step(prob.X, prob.y)
    assert torch.equal(flat_params(saved_model), flat_params(model))


def test_invalid_arguments():
    prob = build_problem("mlp_tanh", "ce-mean")
    m, f = prob.model, prob.loss_fn
    with pytest.raises(ValueError, match="lr"):
        KFAC(m, f, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        KFAC(m, f, momentum=1.0)
    with pytest.raises(ValueError, match="damping"):
        FOOF(m, f, damping=0.0)
    with pytest.raises(ValueError, match="kl_clip"):
        KFAC(m, f, kl_clip=0.0)
    with pytest.raises(ValueError, match="stats_steps"):
        KFAC(m, f, inverse_every=2, stats_steps=3)
    with pytest.raises(ValueError, match="ema_decay"):
        FOOF(m, f, ema_decay=1.0)
    with pytest.raises(ValueError, match="structure"):
        NaturalGradient(m, f, structure="diagonal")
    with pytest.raises(ValueError, match="update_rule"):
        SINGD(m, f, update_rule="kfac")
    with pytest.raises(ValueError, match="one group"):
        KFAC(m, f).add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(curvlab.errors.UnsupportedModelError):
        KFAC(m, nn.L1Loss())
    with pytest.raises(curvlab.errors.ShapeError, match="pair"):
        KFAC(m, f).step(prob.X, prob.y, curvature_batch=(prob.X,))

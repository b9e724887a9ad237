"""KFAC and FOOF optimizers: solves, moving averages, amortisation, KL clipping.

* One step (no momentum, weight decay or clipping; first step or ``ema_decay=0``;
  ``inverse_every=1``) is ``−lr · curvlab.KFAC(capture).solve(g, λ)`` (both damping
  modes, Linear and conv layers, "expand" and "reduce", factors from the same or an
  independent batch) and ``−lr · curvlab.FOOF(capture).solve(g, λ)``.
* Bias-corrected moving averages: after batches ``X_1..X_m`` (parameters frozen with
  ``lr = 0``) the factors in use are ``Σ_j ρ^{m−j}(1 − ρ) X_j / (1 − ρ^m)``.
* Amortisation: statistics are updated on the ``S`` steps ending each inversion and the
  preconditioner is rebuilt every ``T`` steps, and it is frozen in between.
* KL clipping: the step is ``−lr ν d`` with ``lr² ν² Σ_l |d_lᵀ g_l| = κ`` when clipped,
  and untouched when ``κ`` is large.
"""

from __future__ import annotations

import copy

import pytest
import reference as R
import torch
from conftest import build_problem, mc_generator

import curvlab
from curvlab.optim import FOOF, KFAC
from curvlab.optim.amortisation import Amortisation

TOL = 1e-10


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def step_of(opt, prob, batch=None) -> torch.Tensor:
    """Parameter change of one ``opt.step`` on ``batch`` (default: the problem's)."""
    before = flat_params(opt.model)
    x, y = (prob.X, prob.y) if batch is None else batch
    opt.step(x, y)
    return flat_params(opt.model) - before


@pytest.mark.parametrize("ema_decay", [0.95, 0.0])
@pytest.mark.parametrize("damping_mode", ["heuristic", "standard"])
@pytest.mark.parametrize(
    "model_name, loss_name, fisher",
    [("mlp_mixed_bias", "ce-mean", "mc"), ("conv2d_same_dil", "bce-sum", "exact")],
)
def test_kfac_step_equals_solve(model_name, loss_name, fisher, damping_mode, ema_decay):
    prob = build_problem(model_name, loss_name)
    lr, lam = 0.5, 0.03
    capt = prob.capture(fisher, generator=mc_generator(5))
    expect = -lr * curvlab.KFAC(capt, damping_mode).solve(capt.grad, lam)
    opt = KFAC(
        copy.deepcopy(prob.model),
        prob.loss_fn,
        lr=lr,
        damping=lam,
        damping_mode=damping_mode,
        fisher=fisher,
        ema_decay=ema_decay,
        generator=mc_generator(5),
    )
    assert R.rel_err(step_of(opt, prob), expect) < TOL


def test_kfac_reduce_and_curvature_batch():
    """``kfac_approx="reduce"`` on conv layers; factors from an independent batch."""
    prob = build_problem("conv2d_nobias", "ce-mean", seed=0)
    other = build_problem("conv2d_nobias", "ce-mean", n=8, seed=1)
    lam = 0.05
    grad = prob.capture("exact").grad
    kfac = curvlab.KFAC(other.capture("exact"), "standard", kfac_approx="reduce")
    opt = KFAC(
        copy.deepcopy(prob.model),
        prob.loss_fn,
        lr=1.0,
        damping=lam,
        damping_mode="standard",
        fisher="exact",
        kfac_approx="reduce",
    )
    before = flat_params(opt.model)
    opt.step(prob.X, prob.y, curvature_batch=(other.X, other.y))
    assert R.rel_err(flat_params(opt.model) - before, -kfac.solve(grad, lam)) < TOL


@pytest.mark.parametrize("model_name", ["mlp_relu_nobias", "conv1d"])
def test_foof_step_equals_solve(model_name):
    prob = build_problem(model_name, "ce-sum")
    lr, lam = 0.2, 0.07
    capt = prob.capture("empirical")
    expect = -lr * curvlab.FOOF(capt).solve(capt.grad, lam)
    opt = FOOF(copy.deepcopy(prob.model), prob.loss_fn, lr=lr, damping=lam)
    assert R.rel_err(step_of(opt, prob), expect) < TOL


@pytest.mark.parametrize("ema_decay", [0.95, 0.0])
def test_foof_kfac_damping_step(ema_decay):
    """The heuristic damping ``(Â + π√λ I)⁻¹`` with π from the optimizer's own Â and Ĝ:
    a step equals ``−lr ∇W (A + π√λ I)⁻¹`` of a dense float64 reference (first step), and
    after two steps its π is KFAC's π of the same moving averages."""
    prob = build_problem("mlp_mixed_bias", "ce-mean")
    lr, lam = 0.5, 0.03
    capt = prob.capture("mc", generator=mc_generator(5))
    opt = FOOF(
        copy.deepcopy(prob.model),
        prob.loss_fn,
        lr=lr,
        damping=lam,
        damping_mode="heuristic",
        ema_decay=ema_decay,
        generator=mc_generator(5),
    )
    step = step_of(opt, prob)
    for rec in prob.ref("mc", capt).records:
        A, G = R.kfac_factors(rec, prob.scale)
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        damped = A + pi * lam**0.5 * torch.eye(A.shape[0], dtype=A.dtype)
        expect = -lr * R.flat_to_wb(capt.grad[rec.slice], rec) @ torch.linalg.inv(damped)
        assert R.rel_err(R.flat_to_wb(step[rec.slice], rec), expect) < TOL
    other = build_problem("mlp_mixed_bias", "ce-mean", n=7, seed=3)
    pair = [
        cls(
            copy.deepcopy(prob.model),
            prob.loss_fn,
            lr=0.0,
            damping=lam,
            ema_decay=ema_decay,
            generator=mc_generator(5),
            **extra,
        )
        for cls, extra in ((KFAC, {}), (FOOF, {"damping_mode": "heuristic"}))
    ]
    for o in pair:
        for batch in ((prob.X, prob.y), (other.X, other.y)):
            o.step(*batch)
    kfac, foof = pair
    for name, blk in foof.preconditioner.blocks.items():
        assert abs(blk.pi - kfac.factors[name].pi) <= 1e-12 * kfac.factors[name].pi


def batches(n: int):
    """``n`` batches of the same model (same weights), different inputs."""
    return [build_problem("mlp_tanh", "ce-mean", n=5 + j, seed=j) for j in range(n)]


@pytest.mark.parametrize("decay", [0.9, 0.0])
def test_moving_averages_are_bias_corrected(decay):
    probs = batches(3)
    kfac = KFAC(
        copy.deepcopy(probs[0].model), probs[0].loss_fn, lr=0.0, fisher="exact", ema_decay=decay
    )
    foof = FOOF(copy.deepcopy(probs[0].model), probs[0].loss_fn, lr=0.0, ema_decay=decay)
    for p in probs:
        kfac.step(p.X, p.y)
        foof.step(p.X, p.y)
    per_batch = [curvlab.KFAC(p.capture("exact")).factors for p in probs]
    weights = [decay ** (len(probs) - 1 - j) * (1 - decay) for j in range(len(probs))]
    norm = 1 - decay ** len(probs)
    for name, f in kfac.factors.items():
        A = sum(w * fs[name].A for w, fs in zip(weights, per_batch)) / norm
        G = sum(w * fs[name].G for w, fs in zip(weights, per_batch)) / norm
        assert R.rel_err(f.A, A) < 1e-12 and R.rel_err(f.G, G) < 1e-12
        assert R.rel_err(foof.input_factors[name], A) < 1e-12
    assert kfac.stats_updates == foof.stats_updates == 3


def test_amortisation_schedule():
    """T = 4, S = 2: statistics at steps 0, 3, 4, 7, 8; inversions at 0, 4, 8."""
    sched = Amortisation(inverse_every=4, stats_steps=2)
    assert [k for k in range(11) if sched.updates_stats(k)] == [0, 3, 4, 7, 8]
    assert [k for k in range(11) if sched.inverts(k)] == [0, 4, 8]
    assert all(Amortisation(3).updates_stats(k) for k in range(7))
    assert [k for k in range(7) if Amortisation(3, 1).updates_stats(k)] == [0, 3, 6]

    probs = batches(3)
    decay = 0.8
    opt = KFAC(
        copy.deepcopy(probs[0].model),
        probs[0].loss_fn,
        lr=0.0,
        fisher="exact",
        ema_decay=decay,
        inverse_every=4,
        stats_steps=2,
    )
    stats, invs, blocks, used_A = [], [], [], []
    for k in range(11):
        p = probs[k % 3]
        opt.step(p.X, p.y)
        stats.append(opt.stats_updates)
        invs.append(opt.inversions)
        blocks.append(opt.preconditioner)
        used_A.append(opt.factors["0"].A)
    assert stats == [1, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5]
    assert invs == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert all(blocks[k] is blocks[k - 1] for k in range(1, 11) if k % 4)
    assert all(blocks[k] is not blocks[k - 1] for k in (4, 8))
    # in use from step 4: the average of the captures at steps 0, 3, 4 (batches 0, 0, 1)
    factors = [curvlab.KFAC(p.capture("exact")).factors["0"] for p in probs[:2]]
    A = decay**2 * factors[0].A + decay * factors[0].A + factors[1].A
    assert R.rel_err(used_A[4], (1 - decay) * A / (1 - decay**3)) < 1e-12
    assert torch.equal(used_A[3], used_A[0])


@pytest.mark.parametrize("kappa, clipped", [(1e-4, True), (1e3, False)])
def test_kl_clipping(kappa, clipped):
    prob = build_problem("mlp_mixed_bias", "ce-mean")
    lr, lam = 0.5, 0.01
    capt = prob.capture("exact")
    d = curvlab.KFAC(capt).solve(capt.grad, lam)
    opt = KFAC(
        copy.deepcopy(prob.model), prob.loss_fn, lr=lr, damping=lam, fisher="exact", kl_clip=kappa
    )
    step = step_of(opt, prob)
    nu = opt.state["global"]["kl_scale"]
    assert R.rel_err(step, -lr * nu * d) < TOL
    quad = sum((d[info.slice] @ capt.grad[info.slice]).abs() for info in opt.layers)
    assert (lr**2 * quad > kappa) == clipped
    if clipped:
        assert nu < 1
        assert lr**2 * nu**2 * quad == pytest.approx(kappa, rel=1e-10)
    else:
        assert nu == 1.0

"""float32 models: every Woodbury solve path stays within the accuracy float32 data allow.

For a float32 model the captured ``a``, ``e`` and gradient carry float32 rounding; the
best any solver can do with them is the *attainable* answer: an exact float64 solve of
the Fisher those float32-captured quantities define (built here densely, in float64,
from the promoted ``a`` and ``e``).  Against the truth (the same network in float64)
curvlab's float32 result may be at most ``FACTOR`` times as far off as the attainable
one, on ill-conditioned cases (``N = 128``, damping down to 1e-6).  Before the Gram and
the vector algebra moved to float64 these ratios reached 5–60 on the MLP.  The conv net's
conv layer has its Gram formed through per-sample gradients (``T = 16`` locations), which
float32 captures form in float32 before the float64 Gram: it checks that this keeps the
solves within the same factor.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.curvature.gram import choose_scheme

FACTOR = 3.0
N = 128


MODELS = ("mlp", "conv")


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "conv":
        layers = [nn.Conv1d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16, 5)]
    else:
        layers = [nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 5)]
    return nn.Sequential(*layers).double()


def _captures(fisher: str, kind: str) -> tuple[curvlab.Capture, curvlab.Capture]:
    """Captures of the float64 network and of its float32 copy, same batch and labels."""
    model = _model(kind)
    gen = torch.Generator().manual_seed(1)
    shape = (3, 18) if kind == "conv" else (20,)
    X = torch.randn(N, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (N,), generator=gen)
    loss = nn.CrossEntropyLoss()
    c64 = curvlab.capture(model, loss, X, y, fisher, generator=torch.Generator().manual_seed(0))
    model.float()
    c32 = curvlab.capture(
        model, loss, X.float(), y, fisher, generator=torch.Generator().manual_seed(0)
    )
    return c64, c32


def _dense_solve(capt: curvlab.Capture, v: Tensor, damping: float, block: bool) -> Tensor:
    """``(s U Uᵀ + λI)⁻¹ v`` (or its block-diagonal part) in float64 from the captured
    ``a``, ``e`` promoted to float64, with ``U`` formed densely per layer."""
    us = []
    for lc in capt.layers:
        u = torch.einsum("cnto,ntk->ncok", lc.e.double(), lc.a.double())
        us.append(lc.info.to_flat(u).reshape(-1, lc.info.num_params))
    groups = [[u] for u in us] if block else [us]
    out, start = [], 0
    for group in groups:
        u = torch.cat(group, dim=1)
        f = capt.scale * u.T @ u
        f.diagonal().add_(damping)
        out.append(torch.linalg.solve(f, v[start : start + u.shape[1]]))
        start += u.shape[1]
    return torch.cat(out)


def _rel(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


PATHS = {
    "exact.solve": (False, lambda c, v, lam: curvlab.ExactFisher(c).solve(v, lam)),
    "exact.natural_gradient": (
        True,
        lambda c, v, lam: curvlab.ExactFisher(c).natural_gradient(lam),
    ),
    "block.solve": (False, lambda c, v, lam: curvlab.BlockDiagFisher(c).solve(v, lam)),
    "block.natural_gradient": (
        True,
        lambda c, v, lam: curvlab.BlockDiagFisher(c).natural_gradient(lam),
    ),
}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("path", list(PATHS))
def test_float32_solve_within_attainable_error(path: str, fisher: str, kind: str):
    natural, run = PATHS[path]
    block = path.startswith("block")
    c64, c32 = _captures(fisher, kind)
    if kind == "conv":  # the conv layer's Gram goes through its per-sample gradients
        conv = c32.layers[0]
        c, n, t, o = conv.e.shape
        assert t > 1 and choose_scheme(n, c, t, conv.a.shape[-1], o) == "per_sample"
    for vector in ("grad", "random"):
        if natural and vector == "random":
            continue
        if vector == "grad":
            v32, v64 = c32.grad.clone(), c64.grad
        else:
            v32 = torch.randn(c32.num_params, generator=torch.Generator().manual_seed(2))
            v64 = v32.double()
        for damping in (1e-6, 1e-4):
            truth = _dense_solve(c64, v64, damping, block)
            attainable = _dense_solve(c32, v32.double(), damping, block)
            x = run(c32, v32, damping)
            assert x.dtype == torch.float32
            ratio = _rel(x, truth) / _rel(attainable, truth)
            assert ratio <= FACTOR, (path, fisher, vector, damping, ratio)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("shape", [(8, 5000), (3, 1700), (64, 513)])
def test_promoted_products_match_float64(
    monkeypatch: pytest.MonkeyPatch, shape: tuple, threads: int
):
    """The chunk-wise promoted products of float32 per-sample gradients equal the float64
    products of the promoted matrix (several stacks of slabs, one per thread, and a
    partial last one), to float64 rounding."""
    from curvlab.curvature import gram

    monkeypatch.setattr(gram, "PROMOTE_SLAB_BYTES", 8 * shape[0] * 300)  # 300-col slabs
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # slabs per stack
    gen = torch.Generator().manual_seed(0)
    r, p = shape
    x, y = torch.randn(r, p, generator=gen), torch.randn(r + 2, p, generator=gen)
    v = torch.randn(p, dtype=torch.float64, generator=gen)
    c = torch.randn(r, dtype=torch.float64, generator=gen)
    xd, yd = x.double(), y.double()
    gram_xx, xv = gram.promoted_gram_mv(x, v)
    pairs = [
        (gram.promoted_mm(x, x, torch.float64), xd @ xd.T),
        (gram.promoted_mm(x, y, torch.float64), xd @ yd.T),
        (gram_xx, xd @ xd.T),
        (xv, xd @ v),
        (gram.promoted_mv(x, v), xd @ v),
        (gram.promoted_tmv(x, c, v.clone(), alpha=-1.0), v - xd.T @ c),
    ]
    for got, want in pairs:
        assert got.dtype == torch.float64
        assert float((got - want).norm() / want.norm()) <= 1e-12


def test_repeated_solves_use_the_same_per_sample_gradients():
    """The first solve of a float32 capture assembles the Gram (keeping the float32-formed
    per-sample gradients) before forming ``Uᵀv``, so it uses the same ``U`` as every later
    solve: the results are identical, not merely close."""
    _, c32 = _captures("exact", "conv")
    fisher = curvlab.ExactFisher(c32)
    v = torch.randn(c32.num_params, generator=torch.Generator().manual_seed(2))
    first = fisher.solve(v, 1e-6)
    assert torch.equal(fisher.solve(v, 1e-6), first)

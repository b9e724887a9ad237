"""curvlab.distributed: shards on 2 gloo CPU processes equal one process on the whole batch.

The two ranks hold unequal shards (4 + 3 samples) of one float64 batch.  For a Linear
network (T = 1) and a Conv2d network (T > 1, both Gram schemes), with mean and sum
reductions and the exact / empirical Fisher (deterministic columns), every rank checks
the gathered capture, the block-wise Gram, the distributed exact Fisher's ``mv`` and
``solve`` and the all-reduced KFAC / FOOF factors against the single-process objects
on the concatenated batch.
"""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

import curvlab
from curvlab import distributed as D

SHARDS = (4, 3)
TOL = 1e-10


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    return {"mlp": (mlp, (5,)), "cnn": (cnn, (2, 4, 4))}


def _data(shape, loss_name, n=None):
    n = sum(SHARDS) if n is None else n
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    if loss_name.startswith("ce"):
        y = torch.randint(0, 3, (n,), generator=gen)
        return x, y, nn.CrossEntropyLoss(reduction=loss_name.split("-")[1])
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, y, nn.MSELoss(reduction=loss_name.split("-")[1])


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def _check_case(model, x, y, loss_fn, fisher, rank):
    full = curvlab.capture(model, loss_fn, x, y, fisher=fisher)
    lo = sum(SHARDS[:rank])
    sl = slice(lo, lo + SHARDS[rank])
    local = curvlab.capture(model, loss_fn, x[sl], y[sl], fisher=fisher)

    glob = D.gather_capture(local)
    assert glob.scale == pytest.approx(full.scale)
    assert glob.loss == pytest.approx(full.loss, rel=1e-12)
    assert _rel(glob.grad, full.grad) < TOL
    assert _rel(glob.output, full.output) < TOL
    for g, f in zip(glob.layers, full.layers):
        assert _rel(g.a, f.a) < TOL and _rel(g.e, f.e) < TOL

    ref = curvlab.ExactFisher(full)
    for scheme in ("auto", "pairs", "per_sample"):
        k = D.distributed_gram(local, gathered=glob, scheme=scheme)
        assert _rel(k, ref.gram) < TOL, scheme

    dist_f = D.DistributedExactFisher(local)
    v = torch.randn(full.num_params, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    assert _rel(dist_f.mv(v), ref.mv(v)) < TOL
    assert _rel(dist_f.solve(full.grad, 0.1), ref.solve(full.grad, 0.1)) < 1e-9
    assert _rel(dist_f.trace(), ref.trace()) < TOL

    for approx in ("expand", "reduce"):
        mine = D.kfac_factors(local, approx=approx)
        theirs = curvlab.KFAC(full, kfac_approx=approx).factors
        for name, (a, g) in mine.items():
            assert _rel(a, theirs[name].A) < TOL and _rel(g, theirs[name].G) < TOL
    for mode in ("heuristic", "standard"):
        kf = D.DistributedKFAC(local, damping_mode=mode)
        assert _rel(kf.solve(glob.grad, 0.1), curvlab.KFAC(full, mode).solve(full.grad, 0.1)) < 1e-9
    foof = D.DistributedFOOF(local)
    assert _rel(foof.solve(glob.grad, 0.1), curvlab.FOOF(full).solve(full.grad, 0.1)) < 1e-9


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SHARDS)
    )
    try:
        assert D.world_size() == 2 and D.rank() == rank
        for name, (model, shape) in _models().items():
            for loss_name in ("ce-mean", "mse-sum"):
                x, y, loss_fn = _data(shape, loss_name)
                for fisher in ("exact", "empirical"):
                    try:
                        _check_case(model, x, y, loss_fn, fisher, rank)
                    except AssertionError as err:
                        raise AssertionError(f"{name} {loss_name} {fisher}: {err}") from err
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_two_gloo_ranks_match_single_process():
    torch.multiprocessing.spawn(_worker, args=(_free_port(),), nprocs=len(SHARDS), join=True)


def test_single_process_is_identity():
    """Without a process group the distributed objects equal the plain ones."""
    model, shape = _models()["cnn"]
    x, y, loss_fn = _data(shape, "ce-mean")
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    assert D.world_size() == 1 and D.rank() == 0
    ref = curvlab.ExactFisher(capt)
    assert _rel(D.distributed_gram(capt), ref.gram) < TOL
    mine = D.DistributedExactFisher(capt).solve(capt.grad, 0.1)
    assert _rel(mine, ref.solve(capt.grad, 0.1)) < 1e-9
    theirs = curvlab.KFAC(capt).factors
    for name, (a, g) in D.kfac_factors(capt).items():
        assert _rel(a, theirs[name].A) < TOL and _rel(g, theirs[name].G) < TOL


def test_reduction_must_be_given_for_one_sample_shards():
    model, shape = _models()["mlp"]
    x, y, loss_fn = _data(shape, "ce-mean", n=1)
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    with pytest.raises(ValueError, match="reduction"):
        D.gather_capture(capt)
    assert D.gather_capture(capt, reduction="mean").scale == 1.0

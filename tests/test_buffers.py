"""The work-buffer pool (curvlab.buffers): kept per-sample gradients go back to
the pool when their Gram object is collected and are reused by the next one, without
changing any result and never while an object (or a copy of one) still holds them."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import curvlab
from curvlab import buffers
from curvlab.config import options


def _problem(seed: int):
    """A float32 conv net whose conv layer takes the per-sample route (T = 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(128, 5))
    gen = torch.Generator().manual_seed(seed)
    X, y = torch.randn(32, 3, 18, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    return curvlab.capture(
        model, nn.CrossEntropyLoss(), X, y, "mc", generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(autouse=True)
def _empty_pool():
    buffers.release_buffers()
    yield
    buffers.release_buffers()


def test_buffers_return_and_are_reused_without_changing_results():
    fresh = [curvlab.ExactFisher(_problem(s)).natural_gradient(1e-3) for s in (1, 2)]
    buffers.release_buffers()
    fisher = curvlab.ExactFisher(_problem(1))
    first = fisher.natural_gradient(1e-3)
    assert fisher._kept and buffers.held_bytes() > 0  # kept gradients, chunk buffer pooled
    held = buffers.held_bytes()
    del fisher
    gc.collect()
    assert buffers.held_bytes() > held  # the kept per-sample gradients came back
    second = curvlab.ExactFisher(_problem(2)).natural_gradient(1e-3)  # reuses them
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])


def test_a_copy_keeps_its_buffers():
    fisher = curvlab.ExactFisher(_problem(1))
    twin = copy.copy(fisher)
    v = torch.randn(fisher.num_params, generator=torch.Generator().manual_seed(3))
    before = twin.solve(v, 1e-3)
    del fisher
    gc.collect()
    curvlab.ExactFisher(_problem(2)).natural_gradient(1e-3)  # would reuse freed buffers
    assert torch.equal(twin.solve(v, 1e-3), before)


def test_a_new_size_empties_the_pool():
    """Buffers of an earlier problem do not stay once other sizes are asked for."""
    buffers.give([torch.empty(1000), torch.empty(2000, dtype=torch.float64)])
    assert buffers.held_bytes() == 4000 + 16000
    assert buffers.take(1000, torch.float32, torch.device("cpu")).numel() == 1000  # a hit
    assert buffers.held_bytes() == 16000
    buffers.take(3000, torch.float32, torch.device("cpu"))  # a miss
    assert buffers.held_bytes() == 0


def test_a_take_miss_keeps_lent_buffers_tracked():
    """Emptying the pool on a miss of :func:`~curvlab.buffers.take` leaves the lent
    buffers' tracking alone: memory lent earlier and no longer referenced is lent again."""
    cpu = torch.device("cpu")
    lent = buffers.lend(1000, torch.float32, cpu)
    ptr = lent.data_ptr()
    del lent
    buffers.take(3000, torch.float32, cpu)  # a miss
    # still tracked (checked on the pool itself: a fresh allocation could land at ptr too)
    assert [b.data_ptr() for b in buffers._lent] == [ptr]
    assert buffers.lend(1000, torch.float32, cpu).data_ptr() == ptr


def test_pool_stays_within_half_the_budget(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(options, "memory_budget", 2 * 4096)
    buffers.give([torch.empty(1024), torch.empty(1024), torch.empty(1024)])  # 4 KiB each
    assert buffers.held_bytes() == 4096
    assert buffers.take(1024, torch.float32, torch.device("cpu")).numel() == 1024
    assert buffers.held_bytes() == 0


def test_lent_memory_is_reused_only_when_nothing_references_it():
    """A lent buffer comes back only when no tensor, view, detached alias or numpy array
    shares its memory any more."""
    cpu = torch.device("cpu")
    first = buffers.lend(1000, torch.float32, cpu)
    ptr = first.data_ptr()
    assert buffers.lend(1000, torch.float32, cpu).data_ptr() != ptr  # first still held
    for alias in (lambda t: t[10:20], lambda t: t.detach(), lambda t: t.numpy()):
        held = alias(first)
        del first
        assert buffers.lend(1000, torch.float32, cpu).data_ptr() != ptr, alias
        first = buffers.lend(1000, torch.float32, cpu)  # the alias's buffer stays untouched
        assert first.data_ptr() != ptr
        del held, first
        first = buffers.lend(1000, torch.float32, cpu)
        assert first.data_ptr() == ptr  # now free: reused
    second = buffers.lend(1000, torch.float32, cpu)
    assert second.data_ptr() != first.data_ptr()


def test_captures_reuse_patch_memory_without_changing_results():
    """Conv patches (``LayerCapture.a``) of a later capture reuse an earlier capture's
    memory only once that capture is gone; a capture that is still held keeps its rows."""
    held = _problem(1)
    rows = held.layers[0].a.clone()
    fresh = _problem(2).layers[0].a.clone()  # the second capture is dropped at once
    other = _problem(2)
    assert other.layers[0].a.data_ptr() != held.layers[0].a.data_ptr()
    assert torch.equal(held.layers[0].a, rows) and torch.equal(other.layers[0].a, fresh)
    ptr = other.layers[0].a.data_ptr()
    del other
    again = _problem(2)
    assert again.layers[0].a.data_ptr() == ptr and torch.equal(again.layers[0].a, fresh)
    assert torch.equal(held.layers[0].a, rows)

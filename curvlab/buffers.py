"""A pool of CPU work buffers that curvlab's own objects hold privately.

Fresh memory is expensive on CPU: the first touch of every page faults (measured about
0.75 ms per MB on the benchmark machine, benchmarks/RESULTS.md Q2), and glibc returns
large freed blocks to the kernel, so a loop that captures and solves every step pays for
its per-sample gradients' memory again each time.  Buffers that never leave curvlab (the
per-sample gradients a Gram object keeps, its promotion chunks) are therefore taken from
this pool and given back when their owner is collected, to be reused by the next object
that asks for the same size and dtype.  Tensors handed to users (a capture's rows, any
result) never come from here.

The pool keeps at most half of ``curvlab.config.options.memory_budget``, and only while
its buffers keep being asked for: a request it cannot serve (new sizes: another model,
batch size or dtype) empties it first, so buffers of an earlier problem do not sit next
to the new one's.  :func:`release_buffers` empties it and forgets lent buffers.  On other
devices (CUDA has its own caching allocator) :func:`take` allocates and :func:`give`
drops.

Tensors that *are* handed to users (a capture's conv patch rows) may come from
:func:`lend` instead: the pool keeps a reference to every buffer it lent and reuses one
only when nothing else references its memory any more (its storage's use count shows no
tensor, view or alias besides the pool's own), so memory a user still holds is never
handed out again.  Where torch does not expose that count, :func:`lend` allocates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from curvlab.config import options

_free: dict[tuple[int, torch.dtype], list[Tensor]] = {}
_held = [0]  # bytes in the pool


def take(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat tensor of ``numel`` elements (uninitialised), from the pool when one of that
    size and dtype is there; otherwise the pool's free buffers are dropped and a new one
    allocated (lent buffers stay tracked)."""
    if device.type == "cpu":
        stack = _free.get((numel, dtype))
        if stack:
            buf = stack.pop()
            _held[0] -= buf.numel() * buf.element_size()
            return buf
        _free.clear()  # an earlier problem's buffers (lent ones stay tracked: lend drops those)
        _held[0] = 0
    return torch.empty(numel, dtype=dtype, device=device)


def _limit() -> int:
    """Bytes the pool may hold: half the memory budget."""
    return options.memory_budget // 2


def give(buffers: Iterable[Tensor]) -> None:
    """Return flat buffers obtained from :func:`take` that nothing references any more;
    those that do not fit the pool's limit are dropped."""
    for buf in buffers:
        nbytes = buf.numel() * buf.element_size()
        if buf.device.type != "cpu" or _held[0] + nbytes > _limit():
            continue
        _free.setdefault((buf.numel(), buf.dtype), []).append(buf)
        _held[0] += nbytes


_lent: list[Tensor] = []  # buffers inside tensors handed out by lend(), referenced here too
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _count(buf: Tensor) -> int:
    return _use_count(buf.untyped_storage()._cdata)


def _calibrate() -> int | None:
    """The use count of a tensor's storage that nothing else references, measured on
    this torch; ``None`` (no lending) unless one alias is seen to raise it."""
    if _use_count is None:
        return None
    probe = torch.empty(1)
    alone = _count(probe)
    alias = probe.view(-1)  # noqa: F841  (held while counting)
    return alone if _count(probe) > alone else None


_ALONE = _calibrate()


def _unreferenced(buf: Tensor) -> bool:
    """Whether nothing but ``buf`` itself references its memory."""
    return _count(buf) <= _ALONE


def lend(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat tensor of ``numel`` elements (uninitialised) that may be handed to users: an
    alias of a buffer lent before whose memory nothing references any more, or a new one.

    On a miss the unreferenced lent buffers are dropped (other sizes: an earlier problem);
    lent buffers count towards the pool's limit, above which a new one is not tracked."""
    if device.type != "cpu" or _ALONE is None:
        return torch.empty(numel, dtype=dtype, device=device)
    for buf in _lent:
        if buf.numel() == numel and buf.dtype == dtype and _unreferenced(buf):
            return buf.view(-1)  # a new alias: while the caller holds it, buf is referenced
    _lent[:] = [buf for buf in _lent if not _unreferenced(buf)]
    buf = torch.empty(numel, dtype=dtype, device=device)
    lent = sum(b.numel() * b.element_size() for b in _lent)
    if _held[0] + lent + buf.numel() * buf.element_size() <= _limit():
        _lent.append(buf)
        return buf.view(-1)
    return buf


def release_buffers() -> None:
    """Free every buffer the pool holds (lent buffers still in use stay with their users)."""
    _free.clear()
    _held[0] = 0
    _lent.clear()


def held_bytes() -> int:
    """Bytes the pool holds now for :func:`take` (lent buffers not included)."""
    return _held[0]

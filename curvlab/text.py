"""The built-in ``text`` dataset: byte-level next-token prediction on real Python source.

The text is a fixed list of modules of the running Python's own standard library
(:data:`TEXT_FILES`, read from ``sysconfig.get_paths()["stdlib"]``; nothing is
downloaded; the exact bytes depend on the Python version, 3.11 here), concatenated in
that order.  Tokens are bytes, vocabulary :data:`VOCAB` = 128 (ASCII; the few
non-ASCII bytes become token 127).  The stream is cut into consecutive, non-overlapping
windows of ``seq_len + 1`` tokens; a window gives inputs ``w[:-1]`` and next-token
targets ``w[1:]``, both ``(seq_len,)`` ``int64``.  Every 10th window (index ``i`` with
``i % 10 == 9``) is the test split, the others the training split, in stream order.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from curvlab.errors import OptionError

TEXT_FILES = (
    "textwrap.py",
    "string.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "glob.py",
    "colorsys.py",
    "calendar.py",
    "queue.py",
    "sched.py",
    "graphlib.py",
    "keyword.py",
)
"""Standard-library modules that make up the text, in order."""

VOCAB = 128
"""Byte vocabulary (ASCII); non-ASCII bytes map to ``VOCAB - 1``."""

SEQ_LEN = 32
"""Default sequence length (positions per example)."""


@functools.cache
def text_tokens() -> Tensor:
    """The whole token stream ``(L,)`` ``int64``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in TEXT_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the standard library at {root} lacks {', '.join(missing)}; the text dataset "
            "reads these modules of the running Python."
        )
    data = b"\n".join((root / name).read_bytes() for name in TEXT_FILES)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return tokens.clamp_(max=VOCAB - 1)


def text_windows(split: str, seq_len: int = SEQ_LEN) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets of a split, both ``(N, seq_len)`` ``int64``."""
    if seq_len < 1:
        raise OptionError(f"seq_len must be positive, got {seq_len}")
    tokens = text_tokens()
    count = tokens.numel() // (seq_len + 1)
    windows = tokens[: count * (seq_len + 1)].view(count, seq_len + 1)
    test = torch.arange(count) % 10 == 9
    chosen = windows[test if split == "test" else ~test]
    return chosen[:, :-1].clone(), chosen[:, 1:].clone()

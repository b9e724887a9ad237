"""Small numerical helpers of ``curvlab.numerics`` against their plain definitions."""

from __future__ import annotations

import pytest
import torch

from curvlab.numerics import LONG_ROWS, long_tmm, symmetric_block_rows, symmetric_mm


@pytest.mark.parametrize("m", [1, 63, 64, 65, 300, 1000])
@pytest.mark.parametrize("block_rows", [None, 1, 7])
def test_symmetric_mm_equals_full_product(m, block_rows):
    """The lower-block-triangle product, mirrored, equals ``x xᵀ`` entry for entry
    (float64, relative 1e-12), for transposed (strided) inputs too."""
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(13, m, generator=gen, dtype=torch.float64).T  # (m, 13), strided
    got = symmetric_mm(x, block_rows)
    expect = x @ x.T
    assert torch.allclose(got, expect, rtol=1e-12, atol=1e-12 * expect.abs().max().item())


def test_symmetric_block_rows():
    """At most 8 blocks, none smaller than 64 rows (one block for small results)."""
    assert symmetric_block_rows(10) == 64
    assert symmetric_block_rows(256) == 64
    assert symmetric_block_rows(2048) == 256
    assert -(-2049 // symmetric_block_rows(2049)) == 8


@pytest.mark.parametrize("k", [LONG_ROWS - 2, LONG_ROWS, 2 * LONG_ROWS + 6, 2 * LONG_ROWS + 1])
def test_long_tmm_equals_plain_product(k):
    """``rᵀ x`` with the long sum split in halves (even ``K ≥ LONG_ROWS``) or not equals
    the float64 product (relative 1e-12), for a column slice of ``x`` (strided) and
    written into ``out`` (a view of a larger buffer) when given."""
    gen = torch.Generator().manual_seed(k)
    r = torch.randn(k, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(k, 8, generator=gen, dtype=torch.float64)[:, :7]
    expect = r.T @ x
    buf = torch.zeros(40, dtype=torch.float64)
    out = buf[5:40].view(5, 7)
    for got in (long_tmm(r, x), long_tmm(r, x, out=out)):
        assert torch.allclose(got, expect, rtol=1e-12, atol=1e-12 * expect.abs().max().item())
    assert torch.count_nonzero(buf[:5]) == 0  # written in place, nothing outside

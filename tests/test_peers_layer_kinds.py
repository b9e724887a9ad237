"""Layer kinds against curvlinops 3.0.1's ``GGNLinearOperator`` (autograd GGN products
for any architecture): a ResNet with eval BatchNorm, a residual and a depthwise-separable
block, and a decoder with a grouped ConvTranspose2d, GroupNorm, a reflect-padded conv,
Conv3d with BatchNorm3d and a circular Conv1d (fixtures of tests/test_layer_kinds.py).

curvlinops' KFAC treats a grouped convolution with one factor pair whose input factor
averages the patches over the channel groups; curvlab gives layers without Kronecker
factors (grouped convs included) their exact block, so there is no KFAC to compare there.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from conftest import RTOL
from test_layer_kinds import build

import curvlab

curvlinops = pytest.importorskip("curvlinops")


@pytest.mark.parametrize("name,loss_name", [("resnet", "ce-mean"), ("decoder", "mse-sum")])
def test_exact_fisher_vs_curvlinops_ggn(name, loss_name):
    model, loss_fn, X, y, _ = build(name, loss_name)
    params = list(R.trainable_params(model).values())
    op = curvlinops.GGNLinearOperator(model, loss_fn, params, [(X, y)])
    P = sum(p.numel() for p in params)
    G = op @ torch.eye(P, dtype=torch.float64)
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), G) <= RTOL
    assert R.rel_err(R.dense_ggn(model, loss_fn, X, y), G) <= RTOL  # reference vs peer

"""``nn.Embedding`` (with ``padding_idx``) in a token model with outputs ``(N, T, K)``,
against dense float64 references of the whole batch (tests/sequence_reference.py):
flat layout of the weight ``(V, d)`` row-major, ``grad``, ``to_dense``, ``mv``,
``solve``, ``natural_gradient``, ``trace``; KFAC's input factor is the diagonal of token
counts.  Tolerance: relative error ≤ RTOL = 1e-8."""

from __future__ import annotations

import pytest
import reference as R
import sequence_reference as S
import torch
from conftest import DAMPINGS, RTOL, mc_generator
from torch import Tensor, nn

import curvlab
from curvlab.curvature.factors import input_factor
from curvlab.errors import UnsupportedModelError
from curvlab.layers import find_layers
from curvlab.layers.embedding import EmbeddingKind

N, T, V, D, K, PAD = 3, 5, 7, 4, 3, 0


class CausalMean(nn.Module):
    """Parameter-free causal mixing over positions: ``x_t ↦ mean_{s ≤ t} x_s``."""

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        return x.cumsum(1) / steps.view(1, -1, 1)


def _model(padding_idx: int | None = PAD) -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.normal_()  # a nonzero padding row too: it must still get no gradient
    return nn.Sequential(
        emb, nn.Linear(D, 5), nn.Tanh(), CausalMean(), nn.LayerNorm(5), nn.Linear(5, K)
    ).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (N, T), generator=g)
    x[0, :2] = PAD
    x[2, 4] = PAD
    y = torch.randint(0, K, (N, T), generator=g)
    y[0, :2] = -100  # padded positions do not count
    return x, y


@pytest.mark.parametrize("padding_idx", [PAD, None])
@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_embedding_model_against_dense(fisher, padding_idx):
    model, (x, y) = _model(padding_idx), _data()
    loss_fn = nn.CrossEntropyLoss()
    assert isinstance(find_layers(model)[0], EmbeddingKind)
    capt = curvlab.capture(model, loss_fn, x, y, fisher=fisher, generator=mc_generator(4))
    params = list(R.trainable_params(model).values())
    g_ref = R.flatten(torch.autograd.grad(S.user_loss(loss_fn, model(x), y), params))
    assert R.rel_err(capt.grad, g_ref) <= RTOL
    if padding_idx is not None:  # PyTorch gives the padding row no gradient
        assert bool((capt.grad[PAD * D : (PAD + 1) * D] == 0).all())
    if fisher == "exact":
        ref = S.dense_ggn(model, loss_fn, x, y)
    elif fisher == "empirical":
        ref = S.dense_empirical(model, loss_fn, x, y)
    else:
        ref = S.dense_from_columns(model, x, capt.columns, capt.scale)
    for obj in (curvlab.ExactFisher(capt), curvlab.BlockDiagFisher(capt)):
        dense = ref if isinstance(obj, curvlab.ExactFisher) else _block_diag(ref, capt)
        errs = R.interface_errors(obj, dense, DAMPINGS)
        R.assert_close_all(errs, RTOL, f"{type(obj).__name__} {fisher}")
        lam = 0.1
        eye = torch.eye(dense.shape[0], dtype=torch.float64)
        expect = torch.linalg.solve(dense + lam * eye, g_ref)
        assert R.rel_err(obj.natural_gradient(lam), expect) <= RTOL


def _block_diag(F: Tensor, capt) -> Tensor:
    out = torch.zeros_like(F)
    for lc in capt.layers:
        s = lc.info.slice
        out[s, s] = F[s, s]
    return out


def test_embedding_flat_layout_and_input_factor():
    """``split`` gives ``W̄ = Wᵀ`` (d, V); ``join`` inverts it; KFAC's ``A`` is the
    diagonal of token counts over all positions (padding excluded), divided by N·T."""
    model, (x, y) = _model(), _data()
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), x, y)
    emb = capt.layers[0]
    w = model[0].weight.detach()
    flat = capt.params_vector()
    assert torch.equal(capt.split(flat)[emb.name], w.T)
    assert torch.equal(capt.join(capt.split(flat)), flat)
    counts = torch.bincount(x.flatten(), minlength=V).double()
    counts[PAD] = 0
    assert torch.equal(input_factor(emb.a), torch.diag(counts) / (N * T))


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"sparse": True}])
def test_embedding_options_refused(option):
    model = nn.Sequential(nn.Embedding(V, D, **option), nn.Linear(D, K))
    with pytest.raises(UnsupportedModelError, match="Embedding"):
        find_layers(model)

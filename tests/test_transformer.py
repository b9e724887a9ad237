"""The built-in causal transformer LM and text dataset.

The complete tiny transformer (token and position Embedding, pre-LayerNorm blocks with
causal ``scaled_dot_product_attention`` between Linear projections, GELU MLP, final
LayerNorm, Linear head) against dense float64 references of the whole batch
(tests/sequence_reference.py): ``grad``, ``to_dense``, ``mv``, ``solve``,
``natural_gradient``, ``trace`` for token-level CE with ignored targets; its exact GGN
against curvlinops' ``GGNLinearOperator`` (math attention kernel).  Tolerance: relative
error ≤ RTOL = 1e-8.
"""

from __future__ import annotations

import json

import pytest
import reference as R
import sequence_reference as S
import torch
from conftest import DAMPINGS, RTOL, mc_generator
from torch import Tensor, nn

import curvlab
from curvlab.data import load_dataset
from curvlab.models import build_model
from curvlab.text import VOCAB, text_windows
from curvlab.transformer import TransformerLM

N, T, V = 2, 5, 11


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = TransformerLM(V, T, width=8, depth=1, heads=2).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (N, T), generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    y[1, 0] = y[0, 3] = -100
    return x, y


@pytest.mark.parametrize("fisher", ["exact", "empirical", "mc"])
def test_tiny_transformer_against_dense(fisher):
    model, (x, y) = _tiny(), _data()
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, x, y, fisher=fisher, generator=mc_generator(5))
    params = list(R.trainable_params(model).values())
    g_ref = R.flatten(torch.autograd.grad(S.user_loss(loss_fn, model(x), y), params))
    assert R.rel_err(capt.grad, g_ref) <= RTOL
    if fisher == "exact":
        ref = S.dense_ggn(model, loss_fn, x, y)
    elif fisher == "empirical":
        ref = S.dense_empirical(model, loss_fn, x, y)
    else:
        ref = S.dense_from_columns(model, x, capt.columns, capt.scale)
    obj = curvlab.ExactFisher(capt)
    R.assert_close_all(R.interface_errors(obj, ref, DAMPINGS), RTOL, f"transformer {fisher}")
    lam = 0.1
    eye = torch.eye(ref.shape[0], dtype=torch.float64)
    assert R.rel_err(obj.natural_gradient(lam), torch.linalg.solve(ref + lam * eye, g_ref)) <= RTOL


def test_tiny_transformer_ggn_matches_curvlinops():
    pytest.importorskip("curvlinops")
    model, (x, y) = _tiny(), _data()
    y = y.clamp(min=0)  # curvlinops' GGN: no ignored targets
    loss_fn = nn.CrossEntropyLoss()
    G = S.curvlinops_ggn(model, loss_fn, x, y)
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    assert R.rel_err(curvlab.ExactFisher(capt).to_dense(), G) <= RTOL


def test_text_dataset():
    x, y = text_windows("train")
    xt, yt = text_windows("test")
    assert x.shape[1] == 32 and x.dtype == torch.int64
    assert len(x) > 3000 and len(xt) > 300
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB
    assert bytes(x[0, :6].tolist()).isascii()
    ds = load_dataset("text", "test", n=10)
    assert ds.num_classes == VOCAB and ds.input_shape == (32,)
    assert torch.equal(ds.inputs, xt[:10]) and torch.equal(ds.targets, yt[:10])


def test_build_transformer():
    model = build_model("transformer", (32,), VOCAB, seed=1, width=16, depth=1, heads=2)
    out = model(text_windows("test")[0][:3])
    assert out.shape == (3, 32, VOCAB)
    with pytest.raises(ValueError, match="token sequences"):
        build_model("transformer", (1, 8, 8), 10)


def test_cli_compare_and_train_on_text(tmp_path):
    """``compare`` defaults to the MC Fisher on text; ``train`` runs the transformer."""
    from curvlab.cli import main

    out = tmp_path / "c"
    argv = ["compare", "--model", "transformer", "--data", "text", "--batch-size", "2"]
    argv += ["--methods", "kfac,sgd", "--sections", "cosine", "--damping", "0.1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["fisher"] == "mc"
    assert {r["section"] for r in payload["records"]} == {"cosine"}
    out = tmp_path / "t"
    argv = ["train", "--model", "transformer", "--data", "text", "--train-size", "16"]
    argv += ["--methods", "sgd,kfac", "--steps", "2", "--batch-size", "4", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "results.json").exists()

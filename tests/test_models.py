"""Built-in models and loading user models."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from curvlab.layers import find_layers
from curvlab.models import MODELS, ResidualBlock, build_model, kaiming_normal_, load_user_model

IMAGE = (1, 8, 8)
ALLOWED = (
    nn.Sequential, nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Sigmoid,
    nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.BatchNorm2d, nn.AdaptiveAvgPool2d,
    ResidualBlock,
)  # fmt: skip


@pytest.mark.parametrize("name", [m for m in MODELS if not m.startswith("transformer")])
def test_shapes_and_supported_layers(name):
    """The image models (the transformer takes tokens: tests/test_transformer.py)."""
    model = build_model(name, IMAGE, num_classes=10)
    assert model(torch.randn(4, *IMAGE)).shape == (4, 10)
    assert all(isinstance(m, ALLOWED) for m in model.modules())
    assert find_layers(model)


@pytest.mark.parametrize("name", ["mlp", "logreg", "benzing-mlp", "deep-linear"])
def test_fully_connected_models_take_flat_inputs(name):
    model = build_model(name, (64,), num_classes=3)
    assert model(torch.randn(2, 64)).shape == (2, 3)


def test_architectures():
    mlp = build_model("mlp", (64,), 10)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [64, 32, 10]
    assert any(isinstance(m, nn.Tanh) for m in mlp)
    assert any(isinstance(m, nn.ReLU) for m in build_model("mlp", (64,), 10, activation="relu"))
    benzing = build_model("benzing-mlp", (1, 28, 28), 10)
    linear = [m for m in benzing if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [
        (784, 1000), (1000, 1000), (1000, 1000), (1000, 10)
    ]  # fmt: skip
    deep = build_model("deep-linear", (5,), 2, depth=4, width=7)
    assert [type(m) for m in deep][1:] == [nn.Linear] * 4
    assert all(m.bias is None for m in deep if isinstance(m, nn.Linear))
    assert isinstance(build_model("cnn-avg", IMAGE, 10)[2], nn.AvgPool2d)
    assert isinstance(build_model("cnn", IMAGE, 10, pooling="avg")[2], nn.AvgPool2d)
    assert isinstance(build_model("cnn-max", IMAGE, 10)[2], nn.MaxPool2d)
    cnn = build_model("cnn", (3, 32, 32), 10)
    assert cnn[-1].in_features == 16 * 8 * 8
    assert cnn(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resnet_is_in_eval_mode_and_exact():
    """The built-in ResNet (eval BatchNorm, a residual and a depthwise-separable block):
    every layer captured, ``Capture.grad`` equals autograd, the exact Fisher's ``mv``
    equals a dense GGN-vector product from torch.func (float64)."""
    import curvlab

    model = build_model("resnet", IMAGE, num_classes=4, channels=(4, 6)).double()
    assert not model.training
    assert any(m.groups == 4 for m in model.modules() if isinstance(m, nn.Conv2d))
    X = torch.randn(5, *IMAGE, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    params = [p for p in model.parameters() if p.requires_grad]
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(X), y), params)])
    assert torch.linalg.vector_norm(capt.grad - grad) <= 1e-10 * torch.linalg.vector_norm(grad)
    v = torch.randn(capt.num_params, dtype=torch.float64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach() for p in params)
    sizes = [p.numel() for p in params]
    tangents = tuple(t.view_as(p) for t, p in zip(v.split(sizes), params))

    def f(*vals):
        return torch.func.functional_call(model, dict(zip(names, vals)), (X,))

    out, jv = torch.func.jvp(f, values, tangents)
    h = torch.func.hessian(lambda o: loss_fn(o, y))(out.detach()).reshape(out.numel(), -1)
    _, vjp = torch.func.vjp(f, *values)
    ggn_v = torch.cat([g.reshape(-1) for g in vjp((h @ jv.reshape(-1)).view_as(out))])
    got = curvlab.ExactFisher(capt).mv(v)
    assert torch.linalg.vector_norm(got - ggn_v) <= 1e-8 * torch.linalg.vector_norm(ggn_v)


def test_seed_determines_parameters_and_keeps_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("cnn", IMAGE, 10, seed=1)
    b = build_model("cnn", IMAGE, 10, seed=1)
    c = build_model("cnn", IMAGE, 10, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_build_errors():
    with pytest.raises(ValueError, match=", ".join(MODELS)):
        build_model("vgg", IMAGE, 10)
    with pytest.raises(ValueError, match="no option 'depth'.*hidden, activation, bias"):
        build_model("mlp", IMAGE, 10, depth=3)
    with pytest.raises(ValueError, match="no option 'pooling'"):
        build_model("cnn-max", IMAGE, 10, pooling="avg")
    with pytest.raises(ValueError, match="image inputs"):
        build_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="H, W >= 4"):
        build_model("cnn", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="activation"):
        build_model("mlp", IMAGE, 10, activation="gelu")
    with pytest.raises(ValueError, match="depth"):
        build_model("deep-linear", IMAGE, 10, depth=0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = """
        from torch import nn

        NOT_CALLABLE = 3

        def make(width=4):
            return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))

        def not_a_model():
            return "model"

        class Factory:
            @staticmethod
            def build():
                return nn.Linear(3, 1)
    """
    (tmp_path / "curvlab_user_models.py").write_text(textwrap.dedent(source))
    (tmp_path / "curvlab_broken_models.py").write_text("import curvlab_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "curvlab_user_models"
    for name in ("curvlab_user_models", "curvlab_broken_models"):
        sys.modules.pop(name, None)


def test_load_user_model(user_module):
    model = load_user_model(f"{user_module}:make", width=5)
    assert model[0].out_features == 5
    assert isinstance(load_user_model(f"{user_module}:Factory.build"), nn.Linear)


def test_load_user_model_errors(user_module):
    with pytest.raises(ValueError, match="package.module:function"):
        load_user_model(user_module)
    with pytest.raises(ValueError, match="package.module:function"):
        load_user_model(":make")
    with pytest.raises(ImportError, match="cannot find module 'no_such_module_xyz'"):
        load_user_model("no_such_module_xyz:make")
    with pytest.raises(ImportError, match="importing 'curvlab_broken_models'.*dependency"):
        load_user_model("curvlab_broken_models:make")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        load_user_model(f"{user_module}:missing")
    with pytest.raises(TypeError, match="not a function"):
        load_user_model(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(TypeError, match="returned a str"):
        load_user_model(f"{user_module}:not_a_model")


def test_kaiming_normal_init():
    model = build_model("mlp", (400,), 10, hidden=(300, 300), activation="relu")
    state = torch.random.get_rng_state()
    kaiming_normal_(model, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        expect = (2.0 / layer.weight.shape[1]) ** 0.5
        assert abs(float(layer.weight.detach().std()) / expect - 1) < 0.05
        assert abs(float(layer.weight.detach().mean())) < 0.1 * expect
        assert not layer.bias.any()
    again = kaiming_normal_(build_model("mlp", (400,), 10, hidden=(300, 300)), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))

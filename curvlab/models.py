"""Built-in models by name, and loading a user's model from ``package.module:function``.

The built-in models are made of ``nn.Linear`` / ``nn.Conv2d`` layers and
parameter-free layers (activations, pooling, ``nn.Flatten``); ``"resnet"`` adds
BatchNorm and a depthwise convolution (read by their layer kinds, :mod:`curvlab.layers`)
and is returned in eval mode, ``"transformer"`` is made of ``nn.Embedding`` /
``nn.LayerNorm`` / ``nn.Linear`` around attention.  Fully connected models start with
``nn.Flatten`` and accept flat ``(N, d)`` or image ``(N, C, H, W)`` inputs; the
convolutional ones need image inputs, the transformer token inputs ``(N, T)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from curvlab.errors import OptionError
from curvlab.transformer import TransformerLM

MODELS = (
    "mlp",
    "logreg",
    "cnn",
    "cnn-max",
    "cnn-avg",
    "resnet",
    "benzing-mlp",
    "deep-linear",
    "transformer",
    "transformer-tied",
)
"""Names accepted by :func:`build_model`."""

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_POOLING: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int = 0,
    **kwargs,
) -> nn.Module:
    """Build a built-in model whose first layer fits ``input_shape``.

    Models (keyword options in brackets):

    * ``"mlp"``: ``d -> 64 -> 32 -> num_classes`` [``hidden=(64, 32)``, ``activation="tanh"``
      (or ``"relu"``, ``"sigmoid"``), ``bias=True``].
    * ``"logreg"``: one ``Linear(d, num_classes)`` [``bias=True``].
    * ``"cnn"``: ``Conv(C, 8, 3, pad 1)-ReLU-Pool2-Conv(8, 16, 3, pad 1)-ReLU-Pool2-Flatten-
      Linear(16·⌊H/4⌋·⌊W/4⌋, num_classes)`` [``channels=(8, 16)``, ``pooling="max"`` or
      ``"avg"``, ``activation="relu"``].  ``"cnn-max"`` / ``"cnn-avg"`` fix the pooling.
    * ``"resnet"``: a small ResNet in eval mode: ``Conv(C, c1, 3)-BN-ReLU``, one residual
      block ``x + BN(Conv(ReLU(BN(Conv(x)))))`` then ReLU, one depthwise-separable block
      ``Conv(c1, c1, 3, groups=c1)-BN-ReLU-Conv(c1, c2, 1)-BN-ReLU``, global average
      pooling, ``Linear(c2, num_classes)``; convs without bias [``channels=(16, 32)``].
    * ``"benzing-mlp"``: ``d -> 1000 -> 1000 -> 1000 -> num_classes`` with ReLU
      (Benzing 2022, ``d = 784`` on MNIST) [``width=1000``, ``depth=3`` hidden layers].
    * ``"deep-linear"``: ``depth`` linear layers ``d -> width -> ... -> num_classes``,
      no nonlinearity [``depth=3``, ``width=64``, ``bias=False``].
    * ``"transformer"``: a causal transformer language model on token inputs ``(T,)``
      with vocabulary ``num_classes``, outputs ``(N, T, num_classes)``
      (:class:`curvlab.transformer.TransformerLM`) [``width=64``, ``depth=2``,
      ``heads=4``, ``tie_weights=False``].  ``"transformer-tied"``: the same with the
      token embedding matrix as the head's weight (``tie_weights=True``).

    Args:
        name: One of :data:`MODELS`.
        input_shape: Shape of one input, ``(d,)`` or ``(C, H, W)``.
        num_classes: Number of outputs.
        seed: Seeds the parameter initialisation; the global RNG state is left unchanged.
        **kwargs: The model's options listed above.

    Raises:
        ValueError: unknown name, unknown option, or an input shape the model cannot take.
    """
    if name not in _BUILDERS:
        raise OptionError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    builder = _BUILDERS[name]
    options = [
        p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise OptionError(
            f"model '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(options) or 'none'}"
        )
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise OptionError(f"input_shape must be non-empty and positive, got {tuple(input_shape)}")
    if num_classes < 1:
        raise OptionError(f"num_classes must be positive, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(shape, num_classes, **kwargs)


def kaiming_normal_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every ``nn.Linear`` / ``nn.Conv*`` weight in place with Kaiming-normal
    values for ReLU (``std = sqrt(2 / fan_in)``, Benzing 2022's initialisation) and zero
    biases; seeded with ``seed``, the global RNG state unchanged.  Returns ``model``."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
    return model


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise OptionError(f"unknown activation '{name}'; choose one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _fully_connected(
    d_in: int,
    widths: Sequence[int],
    num_classes: int,
    activation: str | None,
    bias: bool,
) -> nn.Sequential:
    """``Flatten`` then ``Linear`` layers ``d_in -> *widths -> num_classes``.

    ``activation=None`` gives a deep linear network.
    """
    sizes = [d_in, *widths, num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d, d_next) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(d, d_next, bias=bias))
        if activation is not None and i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def _mlp(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[int] = (64, 32),
    activation: str = "tanh",
    bias: bool = True,
) -> nn.Module:
    return _fully_connected(math.prod(shape), hidden, num_classes, activation, bias)


def _transformer(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 64,
    depth: int = 2,
    heads: int = 4,
    tie_weights: bool = False,
) -> nn.Module:
    if len(shape) != 1:
        raise OptionError(f"the transformer takes token sequences (T,), got inputs {shape}")
    return TransformerLM(
        num_classes, shape[0], width=width, depth=depth, heads=heads, tie_weights=tie_weights
    )


def _transformer_tied(
    shape: tuple[int, ...], num_classes: int, *, width: int = 64, depth: int = 2, heads: int = 4
) -> nn.Module:
    return _transformer(shape, num_classes, width=width, depth=depth, heads=heads, tie_weights=True)


def _logreg(shape: tuple[int, ...], num_classes: int, *, bias: bool = True) -> nn.Module:
    return _fully_connected(math.prod(shape), (), num_classes, None, bias)


def _benzing_mlp(
    shape: tuple[int, ...], num_classes: int, *, width: int = 1000, depth: int = 3
) -> nn.Module:
    return _fully_connected(math.prod(shape), [width] * depth, num_classes, "relu", True)


def _deep_linear(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int = 3,
    width: int = 64,
    bias: bool = False,
) -> nn.Module:
    if depth < 1:
        raise OptionError(f"deep-linear needs depth >= 1 layers, got {depth}")
    return _fully_connected(math.prod(shape), [width] * (depth - 1), num_classes, None, bias)


def _cnn(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: Sequence[int] = (8, 16),
    pooling: str = "max",
    activation: str = "relu",
) -> nn.Module:
    if len(shape) != 3:
        raise OptionError(
            f"the cnn models need image inputs of shape (C, H, W), got {shape}; "
            "load the dataset without flattening"
        )
    if pooling not in _POOLING:
        raise OptionError(f"unknown pooling '{pooling}'; choose one of {', '.join(_POOLING)}")
    c, h, w = shape
    if len(channels) != 2:
        raise OptionError(f"cnn takes two conv widths, got channels={tuple(channels)}")
    h_out, w_out = h // 4, w // 4
    if h_out < 1 or w_out < 1:
        raise OptionError(f"cnn pools twice by 2 and needs H, W >= 4, got {h}x{w}")
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1),
        _activation(activation),
        _POOLING[pooling](2),
        nn.Conv2d(c1, c2, 3, padding=1),
        _activation(activation),
        _POOLING[pooling](2),
        nn.Flatten(),
        nn.Linear(c2 * h_out * w_out, num_classes),
    )


class ResidualBlock(nn.Module):
    """``ReLU(x + BN(Conv(ReLU(BN(Conv(x))))))`` with 3x3 convs keeping ``c`` channels."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def _resnet(
    shape: tuple[int, ...], num_classes: int, *, channels: Sequence[int] = (16, 32)
) -> nn.Module:
    if len(shape) != 3:
        raise OptionError(
            f"resnet needs image inputs of shape (C, H, W), got {shape}; "
            "load the dataset without flattening"
        )
    if len(channels) != 2:
        raise OptionError(f"resnet takes two widths, got channels={tuple(channels)}")
    c1, c2 = channels
    model = nn.Sequential(
        nn.Conv2d(shape[0], c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        ResidualBlock(c1),
        nn.Conv2d(c1, c1, 3, padding=1, groups=c1, bias=False),  # depthwise
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 1, bias=False),  # pointwise
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, num_classes),
    )
    return model.eval()


def _cnn_fixed(pooling: str) -> Callable[..., nn.Module]:
    """``cnn`` with the pooling fixed (no ``pooling`` option)."""

    def build(
        shape: tuple[int, ...],
        num_classes: int,
        *,
        channels: Sequence[int] = (8, 16),
        activation: str = "relu",
    ) -> nn.Module:
        return _cnn(shape, num_classes, channels=channels, pooling=pooling, activation=activation)

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "logreg": _logreg,
    "cnn": _cnn,
    "cnn-max": _cnn_fixed("max"),
    "cnn-avg": _cnn_fixed("avg"),
    "resnet": _resnet,
    "benzing-mlp": _benzing_mlp,
    "deep-linear": _deep_linear,
    "transformer": _transformer,
    "transformer-tied": _transformer_tied,
}


def load_user_model(spec: str, **kwargs) -> nn.Module:
    """Import ``package.module:function`` and call it with ``kwargs``.

    ``function`` may be a dotted attribute path (``module:Class.factory``) and
    may be a class.  The module must be importable (on ``sys.path``).

    Raises:
        ValueError: ``spec`` is not of the form ``module:function``.
        ImportError: the module cannot be imported.
        AttributeError: the module has no such attribute.
        TypeError: the attribute is not callable or does not return an ``nn.Module``.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise OptionError(
            f"user model '{spec}' must have the form 'package.module:function', e.g. "
            "'mymodels:make_net'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ImportError(
                f"cannot find module '{module_name}' for user model '{spec}'; run from the "
                "folder that contains it or add that folder to PYTHONPATH"
            ) from err
        raise ImportError(
            f"importing '{module_name}' for user model '{spec}' failed: {err}"
        ) from err
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise AttributeError(
                f"'{module_name}' has no attribute '{attr_path}' (looked for '{part}') "
                f"for user model '{spec}'"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"'{spec}' is a {type(target).__name__}, not a function returning a model")
    model = target(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"'{spec}' returned a {type(model).__name__}, expected a torch.nn.Module")
    return model

"""Bad option values raise :class:`curvlab.errors.OptionError` (a curvlab error that is
also a ``ValueError``) whose message names the valid choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab
from curvlab.compare.run import check_sections
from curvlab.config import _env_int
from curvlab.data import load_dataset
from curvlab.errors import CurvlabError, OptionError
from curvlab.models import build_model
from curvlab.optim import KFAC, SINGD, NaturalGradient
from curvlab.plots.style import column_width
from curvlab.train import check_train_methods


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(5, 3), torch.randint(0, 2, (5,))


def _capture() -> curvlab.Capture:
    return curvlab.capture(_model(), nn.CrossEntropyLoss(), *_batch())


CASES = {
    "capture fisher": (
        lambda: curvlab.capture(_model(), nn.CrossEntropyLoss(), *_batch(), "bad"),
        "mc, exact, empirical",
    ),
    "capture mc_samples": (
        lambda: curvlab.capture(_model(), nn.CrossEntropyLoss(), *_batch(), "mc", mc_samples=0),
        "positive integer",
    ),
    "kfac damping_mode": (
        lambda: curvlab.KFAC(_capture(), "bad"),
        "heuristic",
    ),
    "gram scheme": (
        lambda: curvlab.ExactFisher(_capture(), scheme="bad").gram,
        "pairs, per_sample",
    ),
    "natural gradient structure": (
        lambda: NaturalGradient(_model(), nn.CrossEntropyLoss(), structure="bad"),
        "full, block_diagonal",
    ),
    "optimizer lr": (lambda: KFAC(_model(), nn.CrossEntropyLoss(), lr=-1.0), "≥ 0"),
    "singd structure": (
        lambda: SINGD(_model(), nn.CrossEntropyLoss(), structure="bad"),
        "dense",
    ),
    "model name": (lambda: build_model("bad", (4,), 3), "mlp"),
    "dataset": (lambda: load_dataset("bad"), "digits"),
    "sections": (lambda: check_sections(["bad"]), "cosine"),
    "train methods": (lambda: check_train_methods(["bad"]), "kfac"),
    "figure width": (lambda: column_width("three"), "'one', 'two'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_raises_option_error(case):
    call, choices = CASES[case]
    with pytest.raises(OptionError) as info:
        call()
    err = info.value
    assert isinstance(err, CurvlabError) and isinstance(err, ValueError)
    assert choices in str(err), str(err)


def test_bad_environment_limit(monkeypatch):
    monkeypatch.setenv("CURVLAB_MEMORY_BUDGET", "lots")
    with pytest.raises(OptionError, match="CURVLAB_MEMORY_BUDGET='lots' is not a number"):
        _env_int("CURVLAB_MEMORY_BUDGET", 1)

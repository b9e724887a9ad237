"""What cannot be computed exactly is refused, never returned: samples coupled in the
forward pass, layer inputs that are not batch-first, parameters used outside the modules
that own them, modified losses and train-mode randomness in the diagnostics;
unnormalised soft cross-entropy targets and modules called twice are handled exactly."""

from __future__ import annotations

import pytest
import reference as R
import torch
import torch.nn.functional as F
from conftest import RTOL
from torch import Tensor, nn

import curvlab
from curvlab.compare.step_progress import step_progress
from curvlab.errors import SampleCouplingError, ShapeError, UnsupportedModelError
from curvlab.independence import batch_statistics_modules, evaluation_mode
from curvlab.optim import KFAC, NaturalGradient
from curvlab.train import Diagnostics, evaluate

N = 8


def _data(n: int = N, d: int = 4, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=torch.float64, generator=gen)
    return X, torch.randint(0, classes, (n,), generator=gen)


def _seeded(model: nn.Module) -> nn.Module:
    return model.double()


# ----------------------------------------------------------------------------------
# samples coupled in the forward pass
# ----------------------------------------------------------------------------------


class MixBatch(nn.Module):
    """Subtracts half the batch mean: couples the samples without any known module."""

    def forward(self, x: Tensor) -> Tensor:
        return x - 0.5 * x.mean(dim=0, keepdim=True)


def _bn_model(**bn) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False, **bn), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def _mix_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), MixBatch(), nn.Tanh(), nn.Linear(5, 3)).double()


COUPLED = {
    "batchnorm-train": (lambda: _bn_model().train(), "BatchNorm"),
    "batchnorm-no-running-stats": (
        lambda: _bn_model(track_running_stats=False).eval(),
        "track_running_stats=False",
    ),
    "module-mixing-samples": (_mix_model, "a module mixes samples"),
}


@pytest.mark.parametrize("case", list(COUPLED))
def test_coupled_samples_refused_by_exact_objects(case):
    build, why = COUPLED[case]
    model, (X, y) = build(), _data()
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert capt.coupling is not None and why in capt.coupling
    assert R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, y)) <= RTOL
    for make in (curvlab.ExactFisher, curvlab.BlockDiagFisher, curvlab.EKFAC):
        with pytest.raises(SampleCouplingError, match=r"independent samples.*model\.eval\(\)"):
            make(capt)
    with pytest.raises(SampleCouplingError, match=why):
        curvlab.compare(model, loss_fn, X, y, methods=["kfac"], damping=[1e-2], progress=False)
    # Kronecker factors need no independence: KFAC and FOOF keep working
    assert torch.isfinite(curvlab.KFAC(capt).solve(capt.grad, 1e-2)).all()
    assert torch.isfinite(curvlab.FOOF(capt).solve(capt.grad, 1e-2)).all()


def test_kfac_optimizer_trains_batchnorm_model_natural_gradient_refuses():
    X, y = _data()
    model = _bn_model().train()
    opt = KFAC(model, nn.CrossEntropyLoss(), lr=0.1, damping=1e-2)
    for _ in range(2):
        assert torch.isfinite(torch.as_tensor(opt.step(X, y)))
    ng = NaturalGradient(_bn_model().train(), nn.CrossEntropyLoss(), lr=0.1, damping=1e-2)
    with pytest.raises(SampleCouplingError, match="BatchNorm"):
        ng.step(X, y)


def test_batchnorm_in_eval_mode_is_exact():
    model, (X, y) = _bn_model().eval(), _data()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    assert capt.coupling is None
    dense = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(dense, R.dense_ggn(model, loss_fn, X, y)) <= RTOL


def test_sync_batchnorm_detected():
    model = nn.Sequential(nn.Linear(4, 5), nn.SyncBatchNorm(5, affine=False))
    assert batch_statistics_modules(model.train()) == ["1"]
    assert batch_statistics_modules(model.eval()) == []


def test_probe_leaves_no_trace():
    """The independence probe restores buffers, module modes and the RNG state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = _data()
    state = torch.get_rng_state()
    capt = curvlab.capture(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    after = torch.get_rng_state()
    # the capture's own forward drew one dropout mask; the probe drew nothing
    torch.set_rng_state(state)
    model(X)
    assert torch.equal(after, torch.get_rng_state())
    assert capt.coupling is None  # dropout does not couple samples
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------------
# layer inputs that are not batch-first
# ----------------------------------------------------------------------------------


class SequenceFirst(nn.Module):
    """(N, T, d) -> (T, N, d) -> Linear -> mean over T."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.transpose(0, 1)).mean(dim=0)


class FlatTokens(nn.Module):
    """(N, T, d) -> (N·T, d) -> Linear -> (N, T, C) -> mean over T."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        return self.proj(x.reshape(n * t, d)).reshape(n, t, -1).mean(dim=1)


@pytest.mark.parametrize(("module", "t"), [(SequenceFirst, 5), (FlatTokens, 5), (SequenceFirst, N)])
def test_layer_input_not_batch_first_refused(module, t):
    """Including the ambiguous case T = N, which only the probe can tell."""
    torch.manual_seed(0)
    model = module().double()
    X = torch.randn(N, t, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    with pytest.raises(UnsupportedModelError, match="layer 'proj'.*leading dimension"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y)


# ----------------------------------------------------------------------------------
# parameters used outside their module
# ----------------------------------------------------------------------------------


class TiedUse(nn.Module):
    """``enc.weight`` is used by ``enc`` and again through ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.enc(x))
        return self.head(torch.tanh(F.linear(h, self.enc.weight)))


class FunctionalHead(nn.Module):
    """The head computes with the embedding matrix through ``F.linear`` (no module owns
    that use); an ``nn.Linear`` whose weight is the embedding's would be read exactly."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(x)))
        return F.linear(h, self.emb.weight)


class WeightFeedsInput(nn.Module):
    """``head``'s input is computed from ``head.weight``."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x * self.head.weight.sum())


class Skip(nn.Module):
    """Skip connection and modules called out of registration order: accepted."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(5, 3)
        self.early = nn.Linear(4, 5)
        self.mid = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.early(x))
        return self.late(h + torch.tanh(self.mid(h)))


@pytest.mark.parametrize(
    ("module", "name"),
    [(TiedUse, "enc.weight"), (FunctionalHead, "emb.weight"), (WeightFeedsInput, "head.weight")],
)
def test_parameter_used_outside_module_refused(module, name):
    torch.manual_seed(0)
    model, (X, y) = module().double(), _data()
    if module is FunctionalHead:
        X, y = torch.randint(0, 5, (N,)), torch.randint(0, 5, (N,))
    with pytest.raises(UnsupportedModelError, match=f"parameter '{name}' is also used outside"):
        curvlab.capture(model, nn.CrossEntropyLoss(), X, y)


def test_module_called_twice_exact():
    """A module called twice per forward is no longer refused: both calls are read
    (tests/test_shared_parameters.py has the full checks)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model, (X, y) = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 3)).double(), _data()
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    R.assert_capture_grad(capt, model, loss_fn, X, y)
    dense = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(dense, R.dense_ggn(model, loss_fn, X, y)) <= RTOL


def test_skip_connection_out_of_order_accepted():
    torch.manual_seed(0)
    model, (X, y) = Skip().double(), _data()
    loss_fn = nn.CrossEntropyLoss()
    capt = curvlab.capture(model, loss_fn, X, y, fisher="exact")
    R.assert_capture_grad(capt, model, loss_fn, X, y)
    dense = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(dense, R.dense_ggn(model, loss_fn, X, y)) <= RTOL


# ----------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------


class ScaledCE(nn.CrossEntropyLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return 2.0 * super().forward(input, target)


class NamedCE(nn.CrossEntropyLoss):
    """A subclass that keeps the computation."""


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_loss_subclass_overriding_forward_refused():
    with pytest.raises(UnsupportedModelError, match="ScaledCE overrides CrossEntropyLoss.forward"):
        curvlab.capture(_mlp(), ScaledCE(), *_data())
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, a, out: 2 * out)
    with pytest.raises(UnsupportedModelError, match="forward hooks"):
        curvlab.capture(_mlp(), hooked, *_data())


def test_loss_subclass_keeping_forward_accepted():
    X, y = _data()
    model = _mlp()
    capt = curvlab.capture(model, NamedCE(), X, y, fisher="exact")
    dense = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(dense, R.dense_ggn(model, nn.CrossEntropyLoss(), X, y)) <= RTOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unnormalised_soft_targets_exact(reduction):
    """Rows summing to 0.3 … 2.5 scale their sample's Hessian: the exact Fisher equals
    the dense GGN of that loss; the MC columns carry the same √(row sum)."""
    X, _ = _data()
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(N, 3, generator=gen, dtype=torch.float64), 1)
    mass = torch.linspace(0.3, 2.5, N, dtype=torch.float64)
    targets = probs * mass[:, None]
    model, loss_fn = _mlp(), nn.CrossEntropyLoss(reduction=reduction)
    capt = curvlab.capture(model, loss_fn, X, targets, fisher="exact")
    assert R.rel_err(capt.grad, R.batch_gradient(model, loss_fn, X, targets)) <= RTOL
    dense = curvlab.ExactFisher(capt).to_dense()
    assert R.rel_err(dense, R.dense_ggn(model, loss_fn, X, targets)) <= RTOL
    mc = curvlab.capture(model, loss_fn, X, targets, fisher="mc", mc_samples=3)
    with torch.no_grad():
        p = model(X).softmax(1)
    unscaled = mc.columns / (mass.sqrt()[None, :, None] / 3**0.5)
    # each unscaled column is p_n − onehot(ŷ) for a sampled label ŷ
    onehot = p[None] - unscaled
    assert torch.allclose(onehot.sum(-1), torch.ones(3, N, dtype=torch.float64))
    assert torch.allclose(onehot, onehot.round())


def test_negative_soft_target_rows_refused():
    X, _ = _data()
    targets = torch.full((N, 3), 0.2, dtype=torch.float64)
    targets[2] = -0.5
    with pytest.raises(ShapeError, match=r"negative sum \(rows \[2\]\)"):
        curvlab.capture(_mlp(), nn.CrossEntropyLoss(), X, targets, fisher="exact")


# ----------------------------------------------------------------------------------
# train-mode Dropout in the diagnostics
# ----------------------------------------------------------------------------------


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()


def test_compare_refuses_train_mode_dropout():
    X, y = _data()
    model = _dropout_model()
    with pytest.raises(SampleCouplingError, match=r"Dropout.*'1'.*model\.eval\(\)"):
        curvlab.compare(model, nn.CrossEntropyLoss(), X, y, methods=["kfac"], damping=[1e-2])
    records = curvlab.compare(
        model.eval(), nn.CrossEntropyLoss(), X, y, methods=["kfac"], damping=[1e-2]
    )
    assert records


def test_train_diagnostics_and_evaluation_run_in_eval_mode():
    """Diagnostics and test evaluation of a train-mode Dropout model are repeatable (they
    run in eval mode) and leave the model's modes as they were."""
    X, y = _data(n=16)
    model = _dropout_model().train()
    diag = Diagnostics("kfac", methods=("kfac",), damping=1e-2)
    first = diag.records(model, nn.CrossEntropyLoss(), X, y, step=0)
    second = diag.records(model, nn.CrossEntropyLoss(), X, y, step=0)
    assert [r.value for r in first] == [r.value for r in second]
    assert evaluate(model, nn.CrossEntropyLoss(), (X, y)) == evaluate(
        model, nn.CrossEntropyLoss(), (X, y)
    )
    assert all(m.training for m in model.modules())
    with evaluation_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_step_progress_refuses_train_mode_dropout():
    X, y = _data()
    opt = KFAC(_dropout_model(), nn.CrossEntropyLoss(), lr=0.1, damping=1e-2)
    with pytest.raises(SampleCouplingError, match="step_progress.*Dropout"):
        step_progress(opt, [(X, y)])

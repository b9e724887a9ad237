"""Checks of what capture assumes about the batch: samples independent, layer inputs
batch-first, and train-mode randomness.

The exact objects (``ExactFisher``, ``BlockDiagFisher``, EKFAC's eigenvalues) and the
comparison diagnostics treat the captured ``(sample, column)`` gradients as those of
independent per-sample losses.  That fails when the forward pass couples samples:

* **known modules**: BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) that
  normalises with batch statistics, i.e. in ``train()`` mode or with
  ``track_running_stats=False``;
* **any other module** that mixes the batch: detected by a *probe*, a forward pass
  without autograd on the first ``m`` samples (``m = 2``, ``1`` for ``N = 2``), whose
  output must equal the batch's first ``m`` output rows to a relative ``1e-3``
  (``1e-6`` for float64, ``5e-2`` for half types).  Random modules the probe knows
  (Dropout and ``nn.MultiheadAttention``'s attention dropout in ``train()`` mode) are
  switched off for it and compared across two probes instead; unknown randomness shows
  as a mismatch.  The probe restores the model's buffers and the random number
  generator state, so it leaves no trace; it runs without the fused inference path of
  ``nn.MultiheadAttention``, as the capture's forward with autograd does.

:func:`sample_coupling` returns why samples are not independent (``None`` when they
are); :func:`capture` records it as ``Capture.coupling`` and keeps working (Kronecker
factors are well defined either way), while :func:`require_independent` lets the exact
objects refuse.  The same probe checks that every captured layer's input has the batch
as its leading dimension when the batch size changes (a ``(T, N, d)`` input with
``T = N`` passes the capture's own check, not the probe's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from curvlab.errors import SampleCouplingError, UnsupportedModelError
from curvlab.layers import ModuleKind

_PROBE_RTOL = {torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 5e-2}
_DEFAULT_RTOL = 1e-3
EVAL_HINT = "Call model.eval() first (running statistics, no dropout)."


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules that normalise with the statistics of the batch."""
    return _scan(model)[0]


def random_modules(model: nn.Module) -> list[str]:
    """Names of the modules that draw random masks in ``train()`` mode: Dropout with
    ``p > 0``, ``nn.MultiheadAttention`` with ``dropout > 0``."""
    return [name for name, _ in _scan(model)[1]]


def _scan(model: nn.Module) -> tuple[list[str], list[tuple[str, nn.Module]]]:
    """One pass over the modules: batch-statistics BatchNorm names, active dropouts."""
    batch_stats, drops = [], []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            batch_stats.append(name or "<root>")
        elif m.training and (
            (isinstance(m, _DropoutNd) and m.p > 0)
            or (isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
        ):
            drops.append((name or "<root>", m))
    return batch_stats, drops


def require_independent(coupling: str | None, what: str) -> None:
    """Raise :class:`SampleCouplingError` for ``what`` unless ``coupling`` is ``None``."""
    if coupling is not None:
        raise SampleCouplingError(
            f"{what} needs independent samples, but {coupling}; the per-sample "
            f"gradients it is built from would be wrong. {EVAL_HINT} (Kronecker-factor "
            "methods such as KFAC and FOOF still work on such models.)"
        )


def require_deterministic(model: nn.Module, what: str) -> None:
    """Refuse ``what`` (whose loss evaluations must be repeatable) for a model with
    train-mode Dropout."""
    names = random_modules(model)
    if names:
        raise SampleCouplingError(
            f"{what} evaluates the loss several times, but Dropout module(s) "
            f"{', '.join(repr(n) for n in names)} draw a new mask on every forward pass "
            f"in train() mode, so the numbers would be noise. {EVAL_HINT}"
        )


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's own mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def sample_coupling(
    model: nn.Module, inputs: Tensor, output: Tensor, layers: Sequence[ModuleKind]
) -> str | None:
    """Why the samples of ``inputs`` are not independent in ``model``'s forward, or
    ``None`` (module docstring).

    Args:
        model: The network, in the mode of the capture.
        inputs: The batch ``(N, ...)``.
        output: The model's detached output on ``inputs`` ``(N, ...)``.
        layers: The captured layers whose inputs must be checked to follow the batch (those
            with the batch size in more than one dimension; the others were checked by
            capture).

    Raises:
        UnsupportedModelError: a captured layer's input does not follow the probe's batch.
    """
    names, drops = _scan(model)
    if names:
        return (
            f"module(s) {', '.join(repr(n) for n in names)} normalise with batch "
            "statistics (BatchNorm in train() mode or with track_running_stats=False), "
            "which couples the samples"
        )
    n = inputs.shape[0]
    if n < 2:
        return None
    try:
        off = [m for _, m in drops]
        if off:
            # the batch's output carries one draw of the masks: compare two probes instead
            small = _probe(model, inputs[:1], layers, off)
            reference = _probe(model, inputs[:2], layers, off)
        else:
            small, reference = _probe(model, inputs[: 2 if n > 2 else 1], layers, off), output
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 (any failure of the user's forward)
        return (
            f"the model fails on a sub-batch ({type(err).__name__}: {err}), so the "
            "independence of its samples could not be checked"
        )
    k = small.shape[0]
    if small.shape[1:] != output.shape[1:]:
        return (
            f"its output for {k} sample(s) has shape {tuple(small.shape)}, not "
            f"({k}, {', '.join(map(str, output.shape[1:]))}): the output does not follow "
            "the batch"
        )
    rows = reference[:k].to(small.dtype)
    diff, scale = torch.stack([(small - rows).abs().max(), rows.abs().max()]).tolist()
    change = diff / scale if scale > 0 else diff
    if not change <= _PROBE_RTOL.get(small.dtype, _DEFAULT_RTOL):
        return (
            f"the outputs of the first {k} sample(s) change by {change:.1e} (relative) when "
            f"they are run without the rest of the batch: a module mixes samples (or the "
            "forward pass is random)"
        )
    return None


def _probe(
    model: nn.Module, inputs: Tensor, layers: Sequence[ModuleKind], drops: Sequence[nn.Module]
) -> Tensor:
    """``model(inputs)`` without autograd, the Dropouts ``drops`` off, buffers and RNG
    state restored; checks that every captured layer's input follows the batch size
    ``inputs.shape[0]``."""
    m = inputs.shape[0]
    leading: dict[str, list[int]] = {}

    def recorder(info: ModuleKind):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x, d = info.inputs(args, kwargs)[0], info.batch_dim
            if x.dim() > d:
                leading.setdefault(info.name, []).append(x.shape[d])

        return hook

    handles = [
        info.module.register_forward_pre_hook(recorder(info), with_kwargs=True) for info in layers
    ]
    buffers = [(b, b.clone()) for b in model.buffers()]
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for mod in drops:
            mod.training = False
        # the capture's forward (with autograd) never takes the fused inference path of
        # nn.MultiheadAttention / nn.TransformerEncoderLayer: neither may the probe
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = model(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for mod in drops:
            mod.training = True
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    check_batch_first(leading, m)
    if not isinstance(out, Tensor):
        raise UnsupportedModelError("the model must return a single tensor.")
    return out.detach()


def check_batch_first(leading: dict[str, list[int]], n: int) -> None:
    """Refuse captured layers whose input's leading dimension (``leading``, per layer
    name and call, from the capture's forward) is not the batch size ``n``."""
    for name, dims in leading.items():
        for d in dims:
            if d == n:
                continue
            raise UnsupportedModelError(
                f"layer '{name}' receives inputs whose leading dimension is not the batch: "
                f"{d} for a batch of {n} samples. curvlab needs batch-first layer inputs "
                "(N, ..., d): use batch_first=True, keep tokens as (N, T, d) instead of "
                "flattening them to (N·T, d), or freeze the layer."
            )

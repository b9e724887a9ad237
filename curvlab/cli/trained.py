"""Trained points for the command line: ``--weights PATH`` and ``--pretrain STEPS``.

``--weights`` loads a saved ``state_dict`` (``torch.save(model.state_dict(), PATH)``) into
the chosen model; every key and shape must match, or the run stops with a one-line
error naming the first mismatch.  ``--pretrain`` then trains the model for ``STEPS``
mini-batch steps with SGD or Adam on the training examples of the same dataset (batch
order seeded by ``--seed``) before it is diagnosed; a diverged pretraining (a non-finite
loss or parameter, or the first mini-batch's loss risen a hundredfold) stops the run
with a one-line error before any diagnostics.  What was done is recorded in
``results.json`` (``config["weights"]``, ``config["pretrain"]`` and, per model, the
training loss before and after pretraining).

From Python, pass any model as it is to :func:`curvlab.compare.compare`; nothing here is
needed.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.cli.common import UsageError
from curvlab.losses import loss_value

PRETRAIN_METHODS = {"sgd": (torch.optim.SGD, 0.1), "adam": (torch.optim.Adam, 1e-3)}
"""Pretraining optimizers and their default learning rates."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file, recorded so that a report names the exact weights it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors saved at ``path`` (read on the CPU, tensors only).

    Raises:
        UsageError: no such file, or the file holds no state_dict.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"--weights {path}: no such file; pass a state_dict saved with "
            "torch.save(model.state_dict(), PATH)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"--weights {path}: not a readable PyTorch file ({message})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(
            f"--weights {path}: not a state_dict (a dict of tensors); save one with "
            "torch.save(model.state_dict(), PATH)"
        )
    return state


def load_weights(model: nn.Module, state: dict[str, Tensor], path: str, name: str) -> None:
    """Copy ``state`` into ``model`` (model ``name``) after checking every key and shape.

    Raises:
        UsageError: a missing or unexpected key, or a shape that differs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        raise UsageError(
            f"--weights {path} does not fit model '{name}': keys {'; '.join(parts)}; "
            "save the state_dict of the same model"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UsageError(
                f"--weights {path} does not fit model '{name}': '{key}' has shape "
                f"{tuple(state[key].shape)} in the file and {tuple(tensor.shape)} in the model"
            )
    model.load_state_dict(state)


def pretrain(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    config: dict[str, Any],
) -> dict[str, float]:
    """Train ``model`` in place for ``config["pretrain"]["steps"]`` steps.

    Mini-batches of ``batch_size`` examples are drawn without replacement from
    ``inputs``/``targets`` (reshuffled each epoch, seeded by ``config["seed"]``).

    Returns:
        The mean training loss over the first and over the last (up to) ten steps.
    """
    spec = config["pretrain"]
    cls, _ = PRETRAIN_METHODS[spec["method"]]
    optimizer = cls(model.parameters(), lr=spec["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    n, size = len(inputs), min(spec["batch_size"], len(inputs))
    losses: list[float] = []
    order = torch.randperm(n, generator=generator)
    start = 0
    was_training = model.training
    model.train()
    for step in range(spec["steps"]):
        if start + size > n:
            order, start = torch.randperm(n, generator=generator), 0
        pick = order[start : start + size].to(inputs.device)
        start += size
        optimizer.zero_grad(set_to_none=True)
        loss = loss_value(loss_fn, model(inputs[pick]), targets[pick])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == 0:
            first_batch = pick
        if not torch.isfinite(loss.detach()):
            raise _diverged(spec, f"the training loss is {losses[-1]} at step {step + 1}")
    model.zero_grad(set_to_none=True)
    if spec["steps"] > 0:
        _check_diverged(model, loss_fn, inputs[first_batch], targets[first_batch], losses[0], spec)
    model.train(was_training)
    window = min(10, len(losses))
    return {
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }


DIVERGENCE_FACTOR = 100.0
"""Pretraining has diverged when the loss of the first mini-batch ends above this many
times its start (or above this many when it started below 1)."""


def _diverged(spec: dict[str, Any], problem: str) -> UsageError:
    return UsageError(
        f"pretraining diverged at --pretrain-lr {spec['lr']:g} ({spec['method']}, "
        f"{spec['steps']} steps): {problem}; lower --pretrain-lr"
    )


def _check_diverged(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    start: float,
    spec: dict[str, Any],
) -> None:
    """Refuse a pretrained model whose parameters are not finite or whose loss on the first
    mini-batch rose above :data:`DIVERGENCE_FACTOR` times its start: its diagnostics would
    describe a diverged network (saturated outputs, a vanishing or infinite Fisher).

    Raises:
        UsageError: naming the problem and ``--pretrain-lr``.
    """
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise _diverged(spec, f"parameter '{bad[0]}' is not finite")
    with torch.no_grad():
        end = float(loss_value(loss_fn, model(inputs), targets))
    if not math.isfinite(end) or end > DIVERGENCE_FACTOR * max(start, 1.0):
        raise _diverged(
            spec, f"the loss of the first mini-batch went from {start:.3g} to {end:.3g}"
        )

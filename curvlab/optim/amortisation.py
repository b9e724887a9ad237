"""Amortisation schedule and bias-corrected moving averages of curvature statistics.

Schedule (Benzing 2022, Algorithm 1 and App. D): the preconditioner is rebuilt
("inverted") every ``T`` steps, at steps ``k = 0, T, 2T, …`` (0-based), and the
statistics are folded into their moving averages only during the ``S ≤ T`` steps that
end with an inversion, i.e. at steps with ``k mod T = 0`` or ``k mod T > T − S``.
``S = T`` (the default) updates them at every step; ``T = S = 1`` is unamortised.

Moving averages start at zero and are bias corrected (Adam-style): after ``m``
updates with decay ``ρ``,

    avg_m = ρ avg_{m−1} + (1 − ρ) X_m,      X̂_m = avg_m / (1 − ρ^m),

so ``X̂_1 = X_1`` and ``ρ = 0`` uses the latest statistics alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from curvlab.errors import OptionError


@dataclass(frozen=True)
class Amortisation:
    """When to update statistics and when to rebuild the preconditioner.

    Attributes:
        inverse_every: ``T`` ≥ 1, steps between preconditioner rebuilds.
        stats_steps: ``S`` in ``[1, T]``, statistics updates per period (``None`` = ``T``).
    """

    inverse_every: int = 1
    stats_steps: int | None = None

    def __post_init__(self) -> None:
        if int(self.inverse_every) != self.inverse_every or self.inverse_every < 1:
            raise OptionError(f"inverse_every must be an integer ≥ 1, got {self.inverse_every!r}.")
        s = self.stats_steps
        if s is not None and (int(s) != s or not 1 <= s <= self.inverse_every):
            raise OptionError(
                f"stats_steps must be an integer in [1, inverse_every={self.inverse_every}] "
                f"or None, got {s!r}."
            )

    @property
    def period_updates(self) -> int:
        """``S``: statistics updates per period."""
        return self.inverse_every if self.stats_steps is None else self.stats_steps

    def inverts(self, k: int) -> bool:
        """Whether step ``k`` (0-based) rebuilds the preconditioner."""
        return k % self.inverse_every == 0

    def updates_stats(self, k: int) -> bool:
        """Whether step ``k`` (0-based) folds fresh statistics into the averages."""
        r = k % self.inverse_every
        return r == 0 or r > self.inverse_every - self.period_updates


def check_decay(decay: float) -> float:
    """Validate a moving-average decay ``ρ ∈ [0, 1)``."""
    if not 0 <= decay < 1:
        raise OptionError(f"ema_decay must lie in [0, 1), got {decay!r}.")
    return float(decay)


def ema_update(avg: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """``ρ avg + (1 − ρ) value`` as a new tensor (``avg = None`` means zero)."""
    if avg is None:
        return (1 - decay) * value
    return decay * avg + (1 - decay) * value


def debiased(avg: Tensor, decay: float, count: int) -> Tensor:
    """``avg / (1 − ρ^count)``: the bias-corrected average after ``count ≥ 1`` updates."""
    return avg / (1 - decay**count)

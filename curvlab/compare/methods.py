"""The methods a comparison can run: name -> how to build its curvature from one capture.

Every method turns the mini-batch gradient ``g`` into an update direction
``d(λ) = method.solve(g, λ)`` (:meth:`curvlab.Curvature.solve`, so each method keeps
its own damping rule):

======================  ===========================================================
``exact``               full-network Fisher/GGN, ``(F + λI)⁻¹ g`` (Woodbury)
``blockdiag``           exact per-layer blocks, ``(F_ll + λI)⁻¹ g_l``
``kfac``                KFAC/KFC "expand" with heuristic (factored Tikhonov) damping
``kfac-standard``       the same ``A ⊗ G``, damped exactly: ``(A ⊗ G + λI)⁻¹``
``kfac-reduce``         KFC "reduce" factors (differs from ``kfac`` on conv layers only)
``kfac-backpack``       BackPACK's KFLR (exact Fisher) or KFAC (MC) factors, heuristic
``foof``                FOOF, ``G_W (A + λI)⁻¹`` per layer
``foof-kfac-damping``   FOOF with KFAC's A-side damping, ``G_W (A + π√λ I)⁻¹`` (Benzing
                        2022, Fig. 3/4: "KFAC without G")
``ekfac``               EKFAC, ``(C_EKFAC + λI)⁻¹ g``
``sgd``                 no curvature: the gradient itself
======================  ===========================================================

Methods that share a curvature matrix (``kfac`` and ``kfac-standard``; ``foof`` and
``foof-kfac-damping``) have the same :attr:`Method.matrix`, so spectra and matrix errors
are computed once for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from curvlab.curvature import EKFAC, FOOF, KFAC, BlockDiagFisher, Curvature, ExactFisher

if TYPE_CHECKING:
    from curvlab.compare.analysis import Analysis


@dataclass(frozen=True)
class Method:
    """One update rule.

    Attributes:
        name: Registry name.
        summary: One line for ``curvlab list`` and the report.
        build: ``analysis -> Curvature`` (``None`` for ``sgd``, which has none).
        matrix: Name of the curvature matrix the method uses; methods with the same
            ``matrix`` differ only in how they damp it.
    """

    name: str
    summary: str
    build: Callable[[Analysis], Curvature | None]
    matrix: str


def _backpack(analysis: Analysis) -> Curvature:
    try:
        from curvlab.peers.backpack import BackpackKFAC
    except ImportError as err:
        raise ImportError(
            f"kfac-backpack needs BackPACK (pip install backpack-for-pytorch): {err}"
        ) from err

    capt = analysis.capture
    kinds = {"exact": "kflr", "mc": "kfac"}
    if capt.fisher not in kinds:
        raise ValueError(
            f"kfac-backpack needs fisher 'exact' (KFLR) or 'mc' (KFAC), not '{capt.fisher}'"
        )
    return BackpackKFAC(
        capt,
        analysis.model,
        analysis.loss_fn,
        analysis.inputs,
        analysis.targets,
        kinds[capt.fisher],
    )


_METHODS = (
    Method(
        "exact",
        "exact Fisher/GGN, full network: (F + λI)⁻¹ g",
        lambda a: ExactFisher(a.capture),
        "exact",
    ),
    Method(
        "blockdiag",
        "exact per-layer Fisher blocks: (F_ll + λI)⁻¹ g_l",
        lambda a: BlockDiagFisher(a.capture),
        "blockdiag",
    ),
    Method(
        "kfac",
        "KFAC/KFC 'expand', heuristic damping (G + √λ/π)⁻¹ ∇W (A + π√λ)⁻¹",
        lambda a: KFAC(a.capture, "heuristic"),
        "kfac",
    ),
    Method(
        "kfac-standard",
        "KFAC/KFC 'expand', standard damping (A ⊗ G + λI)⁻¹",
        lambda a: KFAC(a.capture, "standard"),
        "kfac",
    ),
    Method(
        "kfac-reduce",
        "KFC 'reduce' factors, heuristic damping",
        lambda a: KFAC(a.capture, "heuristic", kfac_approx="reduce"),
        "kfac-reduce",
    ),
    Method(
        "kfac-backpack",
        "BackPACK's KFLR/KFAC factors, heuristic damping (Sequential models only)",
        _backpack,
        "kfac-backpack",
    ),
    Method("foof", "FOOF: ∇W (A + λI)⁻¹ per layer", lambda a: FOOF(a.capture), "foof"),
    Method(
        "foof-kfac-damping",
        "FOOF with KFAC's A-side damping (Benzing 2022, Fig. 3/4): ∇W (A + π√λ)⁻¹",
        lambda a: FOOF(a.capture, "heuristic"),
        "foof",
    ),
    Method("ekfac", "EKFAC: (C_EKFAC + λI)⁻¹ g", lambda a: EKFAC(a.capture), "ekfac"),
    Method("sgd", "no curvature: the gradient g", lambda a: None, "sgd"),
)

METHODS: dict[str, Method] = {m.name: m for m in _METHODS}
"""Every method by name."""

DEFAULT_METHODS = ("exact", "blockdiag", "kfac", "kfac-standard", "foof", "ekfac", "sgd")
"""Methods compared when none are named."""


def check_methods(names: Sequence[str]) -> list[str]:
    """Validate method names (order kept, duplicates dropped).

    Raises:
        ValueError: an unknown or no method; the message lists the valid names.
    """
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method '{unknown[0]}'; choose from {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    return names

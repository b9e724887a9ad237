"""The one method registry: every update rule by name, for compare, train and the CLI.

A :class:`Method` says how to build its curvature from one captured batch (``build``,
used by :func:`curvlab.compare` and per-step diagnostics) and how to train with it
(``optimizer``; methods without one train with :class:`~curvlab.optim.one_batch.
OneBatchCurvature`, their curvature rebuilt from each mini-batch).  Built-in methods:

======================  ===========================================================
``exact``               full-network Fisher/GGN, ``(F + λI)⁻¹ g`` (Woodbury)
``blockdiag``           exact per-layer blocks, ``(F_ll + λI)⁻¹ g_l``
``kfac``                KFAC/KFC "expand" with heuristic (factored Tikhonov) damping
``kfac-standard``       the same ``A ⊗ G``, damped exactly: ``(A ⊗ G + λI)⁻¹``
``kfac-reduce``         KFC "reduce" factors (differs from ``kfac`` on layers with ``T > 1``:
                        conv, sequence Linear layers, embeddings)
``kfac-backpack``       BackPACK's KFLR (exact Fisher) or KFAC (MC) factors, heuristic
``foof``                FOOF, ``G_W (A + λI)⁻¹`` per layer
``foof-kfac-damping``   FOOF with KFAC's A-side damping, ``G_W (A + π√λ I)⁻¹`` (Benzing
                        2022, Fig. 3/4: "KFAC without G")
``ekfac``               EKFAC, ``(C_EKFAC + λI)⁻¹ g``
``kfoc``                optimal Kronecker factors per layer (nearest Kronecker product)
``shampoo2``            Shampoo², ``L ⊗ R / tr F_ll`` per layer (Morwani et al. 2025)
``shampoo``             Shampoo, ``L^{1/2} ⊗ R^{1/2}`` per layer (Gupta et al. 2018)
``diag-ggn``            diagonal of the compared Fisher/GGN
``diag-ef``             diagonal of the empirical Fisher (Adam's statistic)
``two-level-kfac``      KFAC plus the coarse-space correction (one batch in compare)
``singd``               SINGD, IKFAC rule, dense factors (one batch in compare)
``singd-diagonal``      SINGD with diagonal factors
``singd-blockdiag``     SINGD with block-diagonal factors (blocks of 16)
``singd-hierarchical``  SINGD with hierarchical factors (``k1 = k2 = 15``: dense corner
                        blocks coupled through a diagonal middle)
``sgd``                 no curvature: the gradient itself
======================  ===========================================================

Training hyperparameter defaults of ``sgd``, ``exact``, ``blockdiag``, ``kfac``,
``kfac-standard``, ``foof``, ``two-level-kfac`` and ``singd`` are the best of a small
grid (lr x λ, 50 steps, batch 128) for the built-in MLP on the digits
(``foof-kfac-damping`` takes KFAC's); the others
default to lr 0.1, λ 1e-3 (untuned).  Users add their own with :func:`register_method`
(in Python, or from the command line with ``--plugin package.module:function``,
:func:`load_plugin`); compare, train, the report
and the CLI pick them up without further changes.  A curvature only needs the
:class:`~curvlab.Curvature` interface.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvlab.curvature import (
    EKFAC,
    FOOF,
    KFAC,
    KFOC,
    BlockDiagFisher,
    Curvature,
    DiagEmpiricalFisher,
    DiagFisher,
    ExactFisher,
    Shampoo,
)
from curvlab.errors import OptionError
from curvlab.losses import loss_value

if TYPE_CHECKING:
    from curvlab.compare.analysis import Analysis

Builder = Callable[["Analysis"], Curvature | None]
"""``analysis -> Curvature`` (``None``: no curvature, the gradient itself).  The argument
has ``capture``, ``model``, ``loss_fn``, ``inputs`` and ``targets``."""


@dataclass(frozen=True)
class Method:
    """One update rule.

    Attributes:
        name: Registry name (no commas or spaces: the CLI lists names comma-separated).
        summary: One line for ``curvlab list`` and the report.
        build: How to build its curvature from a captured batch (``None``: training only).
        matrix: Name of the curvature matrix the method uses; methods with the same
            ``matrix`` differ only in how they damp it (default: ``name``).
        optimizer: ``(model, loss_fn, **hparams) -> object with step(inputs, targets)``
            returning the loss before the update (``None``: train with
            :class:`~curvlab.optim.one_batch.OneBatchCurvature` on ``build``).
        defaults: Default training hyperparameters.
        train_summary: One line for the training list (default: ``summary``).
    """

    name: str
    summary: str
    build: Builder | None = None
    matrix: str = ""
    optimizer: Callable[..., Any] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    train_summary: str = ""

    def __post_init__(self) -> None:
        if not self.defaults:
            object.__setattr__(self, "defaults", {"lr": 0.1, "damping": 1e-3})
        if not self.matrix:
            object.__setattr__(self, "matrix", self.name)
        if not self.train_summary:
            object.__setattr__(self, "train_summary", self.summary)

    @property
    def trains(self) -> bool:
        """Whether ``curvlab train`` can run it."""
        return self.optimizer is not None or self.build is not None

    def make_optimizer(self, model: nn.Module, loss_fn: nn.Module, **hparams: Any) -> Any:
        """The method's optimizer for ``model`` with ``hparams`` over its defaults."""
        options = {**self.defaults, **hparams}
        if self.optimizer is not None:
            return self.optimizer(model, loss_fn, **options)
        if self.build is None:
            raise OptionError(f"method '{self.name}' has neither an optimizer nor a curvature")
        from curvlab.optim.one_batch import OneBatchCurvature

        return OneBatchCurvature(model, loss_fn, self.build, **options)


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str,
    summary: str,
    build: Builder | None = None,
    *,
    matrix: str | None = None,
    optimizer: Callable[..., Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    train_summary: str | None = None,
    replace: bool = False,
) -> Method:
    """Add a method to the registry (see :class:`Method` for the arguments).

    Example: a scaled identity as an approximation, usable in ``curvlab.compare``,
    ``curvlab.train`` and the CLI::

        register_method("identity", "λ-free scaled identity", lambda a: MyIdentity(a.capture))

    Raises:
        ValueError: a bad name, a name already taken (unless ``replace``), or neither
            ``build`` nor ``optimizer``.
    """
    if not name or any(ch in name for ch in ", \t\n:") or name.lower() == "none":
        raise OptionError(f"bad method name {name!r}: use letters, digits, '-' or '_'")
    if name in _REGISTRY and not replace:
        raise OptionError(f"method '{name}' is already registered; pass replace=True")
    if build is None and optimizer is None:
        raise OptionError(f"method '{name}' needs a curvature builder or an optimizer")
    method = Method(
        name,
        summary,
        build,
        matrix or "",
        optimizer,
        dict(defaults or {"lr": 0.1, "damping": 1e-3}),
        train_summary or "",
    )
    _REGISTRY[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (no error if absent)."""
    _REGISTRY.pop(name, None)


class _Selection(Mapping[str, Method]):
    """A live, read-only view of the registry's methods that satisfy ``keep``."""

    def __init__(self, keep: Callable[[Method], bool]):
        self._keep = keep

    def __getitem__(self, name: str) -> Method:
        method = _REGISTRY[name]
        if not self._keep(method):
            raise KeyError(name)
        return method

    def __iter__(self) -> Iterator[str]:
        return (n for n, m in list(_REGISTRY.items()) if self._keep(m))

    def __len__(self) -> int:
        return sum(1 for _ in self)


METHODS: Mapping[str, Method] = _Selection(lambda m: m.build is not None)
"""Methods ``compare`` can run (they have a curvature builder), live."""

TRAIN_METHODS: Mapping[str, Method] = _Selection(lambda m: m.trains)
"""Methods ``train`` can run, live."""

DEFAULT_METHODS = ("exact", "blockdiag", "kfac", "kfac-standard", "foof", "ekfac", "sgd")
"""Methods compared when none are named."""


def _check(names: Sequence[str], valid: Mapping[str, Method]) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise OptionError(f"unknown method '{unknown[0]}'; choose from {', '.join(valid)}")
    if not names:
        raise OptionError(f"no method given; choose from {', '.join(valid)}")
    return names


def check_methods(names: Sequence[str]) -> list[str]:
    """Validate compare method names (order kept, duplicates dropped).

    Raises:
        ValueError: an unknown or no method; the message lists the valid names.
    """
    return _check(names, METHODS)


def check_train_methods(names: Sequence[str]) -> list[str]:
    """Validate training method names (order kept, duplicates dropped).

    Raises:
        ValueError: an unknown or no method; the message lists the valid names.
    """
    return _check(names, TRAIN_METHODS)


def load_plugin(spec: str) -> None:
    """Import ``package.module`` (which registers methods when imported) or import
    ``package.module`` and call ``function()`` for ``package.module:function``.

    Raises:
        ValueError: a malformed spec, a module that cannot be imported, or an attribute
            that is missing or not callable (one line, naming the spec).
    """
    module_name, sep, attr = spec.partition(":")
    if not module_name or (sep and not attr):
        raise OptionError(f"plugin '{spec}' must be 'package.module' or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OptionError(
            f"cannot import plugin module '{module_name}' ({err}); run from the folder that "
            "holds it or add that folder to PYTHONPATH"
        ) from err
    if not sep:
        return
    target = getattr(module, attr, None)
    if not callable(target):
        raise OptionError(f"plugin '{spec}': '{module_name}' has no function '{attr}'")
    target()


# ----------------------------------------------------------------------------------
# built-in methods
# ----------------------------------------------------------------------------------


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
        raise OptionError(
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


class _SGD:
    """``torch.optim.SGD`` over the trainable parameters with a batch-taking step."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, **options: Any):
        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.loss_fn = model, loss_fn
        self.opt = torch.optim.SGD(params, **options)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        self.opt.zero_grad()
        with torch.enable_grad():
            loss = loss_value(self.loss_fn, self.model(inputs), targets)
            loss.backward()
        self.opt.step()
        return float(loss.detach())


def _optimizer(name: str) -> Callable[..., Any]:
    """The :mod:`curvlab.optim` class ``name``, imported on first use."""

    def make(model: nn.Module, loss_fn: nn.Module, **options: Any) -> Any:
        import curvlab.optim

        return getattr(curvlab.optim, name)(model, loss_fn, **options)

    return make


def _two_level(analysis: Analysis) -> Curvature:
    from curvlab.curvature.two_level import TwoLevelKFACCurvature

    return TwoLevelKFACCurvature(analysis.capture)


def _singd(structure: str) -> Builder:
    def build(analysis: Analysis) -> Curvature:
        from curvlab.curvature.singd import SINGDCurvature

        return SINGDCurvature(analysis.capture, structure)

    return build


def _register_builtins() -> None:
    builtins = [
        Method(
            "exact",
            "exact Fisher/GGN, full network: (F + λI)⁻¹ g",
            lambda a: ExactFisher(a.capture),
            optimizer=_optimizer("NaturalGradient"),
            defaults={"lr": 0.3, "damping": 0.1},
            train_summary="exact natural gradient, full Fisher (Woodbury)",
        ),
        Method(
            "blockdiag",
            "exact per-layer Fisher blocks: (F_ll + λI)⁻¹ g_l",
            lambda a: BlockDiagFisher(a.capture),
            optimizer=_optimizer("NaturalGradient"),
            defaults={"lr": 0.3, "damping": 0.1, "structure": "block_diagonal"},
            train_summary="exact natural gradient, block-diagonal Fisher",
        ),
        Method(
            "kfac",
            "KFAC/KFC 'expand', heuristic damping (G + √λ/π)⁻¹ ∇W (A + π√λ)⁻¹",
            lambda a: KFAC(a.capture, "heuristic"),
            optimizer=_optimizer("KFAC"),
            defaults={"lr": 0.1, "damping": 1e-3},
            train_summary="KFAC, heuristic damping",
        ),
        Method(
            "kfac-standard",
            "KFAC/KFC 'expand', standard damping (A ⊗ G + λI)⁻¹",
            lambda a: KFAC(a.capture, "standard"),
            matrix="kfac",
            optimizer=_optimizer("KFAC"),
            defaults={"lr": 0.03, "damping": 1e-3, "damping_mode": "standard"},
            train_summary="KFAC, standard damping (A ⊗ G + λI)⁻¹",
        ),
        Method(
            "kfac-reduce",
            "KFC 'reduce' factors, heuristic damping",
            lambda a: KFAC(a.capture, "heuristic", kfac_approx="reduce"),
            defaults={"lr": 0.1, "damping": 1e-3},
        ),
        Method(
            "kfac-backpack",
            "BackPACK's KFLR/KFAC factors, heuristic damping (Sequential models only)",
            _backpack,
            defaults={"lr": 0.1, "damping": 1e-3},
        ),
        Method(
            "foof",
            "FOOF: ∇W (A + λI)⁻¹ per layer",
            lambda a: FOOF(a.capture),
            optimizer=_optimizer("FOOF"),
            defaults={"lr": 0.3, "damping": 1e-3},
            train_summary="FOOF, (A + λI)⁻¹ per layer",
        ),
        Method(
            "foof-kfac-damping",
            "FOOF with KFAC's A-side damping (Benzing 2022, Fig. 3/4): ∇W (A + π√λ)⁻¹",
            lambda a: FOOF(a.capture, "heuristic"),
            matrix="foof",
            optimizer=_optimizer("FOOF"),
            defaults={"lr": 0.1, "damping": 1e-3, "damping_mode": "heuristic"},
            train_summary="FOOF with KFAC's A-side damping, (A + π√λ I)⁻¹ per layer",
        ),
        Method(
            "ekfac",
            "EKFAC: (C_EKFAC + λI)⁻¹ g",
            lambda a: EKFAC(a.capture),
            defaults={"lr": 0.1, "damping": 1e-3},
        ),
        Method(
            "sgd",
            "no curvature: the gradient g",
            lambda a: None,
            optimizer=_SGD,
            defaults={"lr": 0.3},
            train_summary="stochastic gradient descent (torch.optim.SGD)",
        ),
        Method(
            "kfoc",
            "KFOC: optimal Kronecker factors per layer, (X* ⊗ Y* + λI)⁻¹",
            lambda a: KFOC(a.capture),
        ),
        Method(
            "shampoo2",
            "Shampoo²: L ⊗ R / tr F_ll per layer, (C + λI)⁻¹",
            lambda a: Shampoo(a.capture, 1.0),
        ),
        Method(
            "shampoo",
            "Shampoo: L^½ ⊗ R^½ per layer, (C + λI)⁻¹",
            lambda a: Shampoo(a.capture, 0.5),
        ),
        Method(
            "diag-ggn",
            "diagonal of the compared Fisher/GGN, g / (D + λ)",
            lambda a: DiagFisher(a.capture),
        ),
        Method(
            "diag-ef",
            "diagonal of the empirical Fisher (Adam's statistic), g / (D + λ)",
            lambda a: DiagEmpiricalFisher(a.capture),
        ),
        Method(
            "two-level-kfac",
            "two-level KFAC: KFAC_λ⁻¹ g + Zᵀ(F_c + λI)⁻¹ Z g (one batch)",
            _two_level,
            matrix="kfac",
            optimizer=_optimizer("TwoLevelKFAC"),
            defaults={"lr": 0.1, "damping": 1e-3},
            train_summary="KFAC plus the coarse-space correction",
        ),
        Method(
            "singd",
            "SINGD (IKFAC) fixed point, dense factors (one batch)",
            _singd("dense"),
            matrix="kfac",
            optimizer=_optimizer("SINGD"),
            defaults={"lr": 0.05, "damping": 1e-3},
            train_summary="SINGD (IKFAC rule, dense factors)",
        ),
        Method(
            "singd-diagonal",
            "SINGD (IKFAC) fixed point, diagonal factors (one batch)",
            _singd("diagonal"),
            optimizer=_optimizer("SINGD"),
            defaults={"lr": 0.05, "damping": 1e-3, "structure": "diagonal"},
            train_summary="SINGD (IKFAC rule, diagonal factors)",
        ),
        Method(
            "singd-blockdiag",
            "SINGD (IKFAC) fixed point, block-diagonal factors (one batch)",
            _singd("block_diagonal"),
            optimizer=_optimizer("SINGD"),
            defaults={"lr": 0.05, "damping": 1e-3, "structure": "block_diagonal"},
            train_summary="SINGD (IKFAC rule, block-diagonal factors)",
        ),
        Method(
            "singd-hierarchical",
            "SINGD (IKFAC) fixed point, hierarchical factors k1 = k2 = 15 (one batch)",
            _singd("hierarchical"),
            optimizer=_optimizer("SINGD"),
            defaults={"lr": 0.05, "damping": 1e-3, "structure": "hierarchical"},
            train_summary="SINGD (IKFAC rule, hierarchical factors)",
        ),
    ]
    for method in builtins:
        _REGISTRY[method.name] = method


_register_builtins()

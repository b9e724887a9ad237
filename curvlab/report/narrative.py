"""Short narrative per report section: what was measured and the headline numbers.

Text only restates records (nothing is computed beyond picking, sorting and
formatting values), so every number quoted is also in ``results.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from curvlab.records import NETWORK, Record, to_dataframe
from curvlab.report.findings import findings_paragraphs

_INTRO = {
    "cosine": (
        "Cosine similarity between update directions d = solve(g, λ) — each method's own "
        "damping rule — for the whole network and per layer. `cosine` is Euclidean; "
        "`cosine_<m>` uses the inner product of method m's curvature (with FOOF's A ⊗ I as "
        "in Benzing 2022, Fig. 3B). The heatmap shows every pair at λ = {lam:g}; all λ and "
        "layers are in results.csv."
    ),
    "relative_error": (
        "Relative Frobenius error ‖C − F‖ / ‖F‖ of each approximation C against the exact "
        "Fisher/GGN F, per layer and for the whole network, computed from Gram and "
        "Kronecker identities (no P x P matrix is formed). Off-diagonal blocks of F count "
        "in the network error, so block-diagonal methods cannot reach zero there. "
        "`frobenius_cosine` ⟨C, F⟩ / (‖C‖ ‖F‖) ignores scale (FOOF's A ⊗ I is not meant to "
        "match F's scale)."
    ),
    "spectrum": (
        "Eigenvalues of each curvature matrix (numerically non-zero ones, largest first): "
        "the exact spectrum from the N·C' x N·C' Gram matrix, Kronecker-factored spectra as "
        "products of factor spectra, block-diagonal spectra as the union of the blocks'. "
        "`top_k_overlap` (index k) is ‖X_kᵀ W_k‖² / k between the exact top-k eigenvectors "
        "X_k and the approximation's W_k (1 = same subspace)."
    ),
    "damping": (
        "Damping effects over the λ grid: cosine of every direction with the {ref} "
        "direction (heuristic vs standard KFAC damping, Benzing 2022, Fig. 3A); KFAC "
        "against FOOF, Euclidean and in FOOF's inner product (Fig. 3B); "
        "`cross_terms_ratio` ‖π√λ I⊗G + A⊗(√λ/π) I‖ / ‖λI‖, what heuristic damping adds "
        "beyond λI; `effective_step_size` ‖d_l‖ / ‖g_l‖ per layer."
    ),
    "progress": (
        "Relative decrease of the mini-batch loss, (L(θ) − L(θ − η d)) / L(θ), after one "
        "step of each method (positive = the loss went down), at the best learning rate η "
        "of the grid (`best_relative_loss_decrease`; every η is in results.csv). Rows with "
        "a reference rescale every step per layer to that method's norms, so only "
        "directions differ (Benzing 2022, Fig. 4C)."
    ),
    "kfc_check": (
        "KFC assumption checks per conv layer: relative Frobenius error of the exact "
        "layer block against IAD (independent activations and derivatives), IAD + SH "
        "(spatial homogeneity) and KFC = IAD + SH + SUD (spatially uncorrelated "
        "derivatives; equal to KFAC 'expand'), and the spatial correlation of centred "
        "activations (SUA) and of derivatives (SUD) against the Chebyshev distance of "
        "location pairs."
    ),
}


def _fmt(values: pd.Series) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in values.items())


def _per_model(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if "model" not in df.columns:
        return [("", df)]
    return [(f"{m}: ", df[df["model"] == m]) for m in dict.fromkeys(df["model"])]


def _close(column: pd.Series, value: float) -> pd.Series:
    return np.isclose(column.astype(float), value)


def _cosine(df: pd.DataFrame, lam: float, ref: str) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        rows = sub[
            (sub["metric"] == "cosine")
            & (sub["layer"] == NETWORK)
            & (sub["reference"] == ref)
            & _close(sub["damping"], lam)
        ]
        if not rows.empty:
            values = rows.set_index("method")["value"].sort_values(ascending=False)
            out.append(f"{label}cosine with {ref} at λ = {lam:g}: {_fmt(values)}.")
    return out


def _relative_error(df: pd.DataFrame) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        rows = sub[(sub["metric"] == "relative_frobenius_error") & (sub["layer"] == NETWORK)]
        if not rows.empty:
            values = rows.set_index("method")["value"].sort_values()
            out.append(f"{label}network relative error: {_fmt(values)}.")
    return out


def _spectrum(df: pd.DataFrame) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        eig = sub[(sub["metric"] == "eigenvalue") & (sub["layer"] == NETWORK)]
        if not eig.empty:
            top = eig.groupby("method", sort=False)["value"].max()
            out.append(f"{label}largest eigenvalue: {_fmt(top)}.")
            kept = eig.groupby("method", sort=False).agg(
                kept=("value", "size"), total=("num_nonzero", "max")
            )
            cut = kept[kept["kept"] < kept["total"]]
            if not cut.empty:
                parts = ", ".join(f"{m} {int(r.kept)} of {int(r.total)}" for m, r in cut.iterrows())
                out.append(
                    f"{label}spectra keep the largest eigenvalues only ({parts}; "
                    "--max-eigenvalues); the density plot shows those."
                )
        ov = sub[(sub["metric"] == "top_k_overlap") & (sub["layer"] == NETWORK)]
        if not ov.empty:
            k = int(ov["index"].max())
            values = ov[ov["index"] == k].set_index("method")["value"].sort_values(ascending=False)
            out.append(f"{label}top-{k} eigenspace overlap with exact: {_fmt(values)}.")
    return out


def _damping(df: pd.DataFrame, ref: str) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        rows = sub[(sub["metric"] == "cosine") & (sub["reference"] == ref)]
        parts = []
        for method, line in rows.groupby("method", sort=False):
            line = line.sort_values("damping")
            first, last = line.iloc[0], line.iloc[-1]
            parts.append(
                f"{method} {first['value']:.3g} (λ = {first['damping']:g}) → "
                f"{last['value']:.3g} (λ = {last['damping']:g})"
            )
        if parts:
            out.append(f"{label}cosine with {ref} across the grid: {'; '.join(parts)}.")
    return out


def _progress(df: pd.DataFrame, lam: float) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        rows = sub[(sub["metric"] == "best_relative_loss_decrease") & _close(sub["damping"], lam)]
        for ref, group in rows.groupby(rows["reference"].fillna(""), sort=False):
            values = group.set_index("method")["value"].sort_values(ascending=False)
            how = f" (steps rescaled to {ref}'s per-layer norms)" if ref else ""
            out.append(f"{label}best relative loss decrease at λ = {lam:g}{how}: {_fmt(values)}.")
    return out


def _kfc(df: pd.DataFrame) -> list[str]:
    out = []
    for label, sub in _per_model(df):
        rows = sub[sub["metric"].isin(["iad", "iad_sh", "kfc"])]
        for layer, group in rows.groupby("layer", sort=False):
            values = group.set_index("metric")["value"]
            out.append(f"{label}layer {layer}: relative error {_fmt(values)}.")
    return out


def trained_point(config: Mapping[str, Any]) -> str:
    """Where the models were diagnosed: initial weights, loaded weights, and/or after
    pretraining (with its training losses per model)."""
    weights, spec = config.get("weights"), config.get("pretrain")
    if weights is None and spec is None:
        return "at the models' initial weights"
    parts = []
    if weights is not None:
        parts.append(f"with the weights of {weights['path']}")
    if spec is not None:
        losses = [
            f"{model} {p['pretrain']['first_loss']:.3g} → {p['pretrain']['last_loss']:.3g}"
            for model, p in config.get("problems", {}).items()
            if "pretrain" in p
        ]
        trained = (
            f"after {spec['steps']} steps of {spec['method']} (learning rate {spec['lr']:g}, "
            f"batch {spec['batch_size']}) on the training split"
        )
        if losses:
            trained += f" (training loss, first → last steps: {', '.join(losses)})"
        parts.append(trained)
    return " ".join(parts)


def _layer_structure(config: Mapping[str, Any]) -> str:
    """Which layers KFAC, EKFAC and FOOF treat exactly (``config["problems"]``)."""
    parts = [
        f"{model}: {', '.join(info['exact_layers'])}"
        for model, info in config.get("problems", {}).items()
        if info.get("exact_layers")
    ]
    if not parts:
        return ""
    return (
        " KFAC, EKFAC and FOOF use Kronecker factors where a layer kind defines them and the "
        f"exact layer block for the other layers ({'; '.join(parts)})."
    )


def narrative(records: Sequence[Record], config: Mapping[str, Any]) -> dict[str, str]:
    """Text per section (keys are section names) plus ``"findings"``, which opens the report
    (what was compared), and each model's findings sentences
    (:func:`~curvlab.report.findings.findings_paragraphs`, keys ``"findings_<model>"``).

    Args:
        records: The report's records.
        config: The run configuration; ``headline_damping`` and ``reference`` are read.
    """
    df = to_dataframe(records)
    lam = float(config["headline_damping"])
    ref = str(config.get("reference", "exact"))
    models = ", ".join(config.get("models", [])) or "the model"
    summary = (
        f"curvlab compared {', '.join(config.get('methods', []))} against the exactly "
        f"computed Fisher (type '{config.get('fisher', 'exact')}'; 'exact' is the type-2 "
        f"Fisher = GGN) on one batch of "
        f"{config.get('batch_size', '?')} examples of '{config.get('data', '?')}' for "
        f"{models}, from a single capture per model, {trained_point(config)}. Every value "
        "is in results.csv and results.json; figures are in figures/ (PNG and PDF)."
        + _layer_structure(config)
    )
    text = {"findings": summary}
    for key, paragraph in findings_paragraphs(records, config).items():
        text[key] = f"{text[key]}\n\n{paragraph}" if key in text else paragraph
    details = {
        "cosine": lambda d: _cosine(d, lam, ref),
        "relative_error": _relative_error,
        "spectrum": _spectrum,
        "damping": lambda d: _damping(d, ref),
        "progress": lambda d: _progress(d, lam),
        "kfc_check": _kfc,
    }
    for section in dict.fromkeys(df["section"]):
        if section not in _INTRO:
            continue
        rows = df[df["section"] == section]
        lines = [_INTRO[section].format(lam=lam, ref=ref), *details[section](rows)]
        text[section] = "\n\n".join(lines)
    return text

"""Q2: capture overhead of KFAC / FOOF factors, and FOOF vs KFAC time per update.

Part 1 (overhead), timed interleaved in one process, ratios against a plain
forward + ``loss.backward()``:

* ``capture``: ``curvlab.capture(fisher="mc")`` alone (one forward, one batched
  backward of the gradient and one sampled column, mini-batch gradient included);
* ``kfac_factors``: that capture + KFAC's ``A`` and ``G`` for every layer
  (``curvlab.curvature.factors.input_factor`` / ``grad_factor``);
* ``foof_factors``: ``capture(fisher="empirical")`` + ``A`` for every layer.

Part 2 (per update, amortised): an optimiser step computes a gradient and a
preconditioned direction; every ``T`` steps it refreshes the curvature (capture +
factors + eigendecompositions, ``KFAC(capt)`` / ``FOOF(capt)``), in between it
takes a plain gradient and re-uses the cached eigenbases (``solve(g, λ)``).  A cycle
of ``T`` steps is timed as a whole; time per update = cycle time / T (median of
cycles).  SGD (plain gradient only) is the reference.

    python -m benchmarks.bench_capture_overhead --quick
    python -m benchmarks.bench_capture_overhead            # MLP + CNN, N = 256
    python -m benchmarks.bench_capture_overhead --n 128 256 512
"""

from __future__ import annotations

import argparse
import sys
import time

import curvlab
from benchmarks import common as C
from curvlab.curvature.factors import grad_factor, input_factor

DAMPING = 1e-3


def overhead_fns(model, loss_fn, x, y) -> dict:
    """The part-1 closures."""

    def kfac_factors():
        capt = curvlab.capture(model, loss_fn, x, y, fisher="mc")
        return [(input_factor(lc.a), grad_factor(lc.e, capt.scale)) for lc in capt.layers]

    def foof_factors():
        capt = curvlab.capture(model, loss_fn, x, y, fisher="empirical")
        return [input_factor(lc.a) for lc in capt.layers]

    return {
        "plain": lambda: C.plain_gradient(model, loss_fn, x, y),
        "capture": lambda: curvlab.capture(model, loss_fn, x, y, fisher="mc"),
        "kfac_factors": kfac_factors,
        "foof_factors": foof_factors,
    }


def run_cycle(method: str, period: int, model, loss_fn, x, y, device: str) -> float:
    """Seconds for ``period`` optimiser steps with one curvature refresh."""
    C.sync(device)
    t0 = time.perf_counter()
    curv = None
    for step in range(period):
        if method == "sgd":
            C.plain_gradient(model, loss_fn, x, y)
            continue
        if step == 0:
            fisher = "mc" if method == "kfac" else "empirical"
            capt = curvlab.capture(model, loss_fn, x, y, fisher=fisher)
            curv = curvlab.KFAC(capt) if method == "kfac" else curvlab.FOOF(capt)
            curv.solve(capt.grad, DAMPING)
        else:
            curv.solve(C.plain_gradient(model, loss_fn, x, y), DAMPING)
    C.sync(device)
    return time.perf_counter() - t0


def measure(model_name: str, n: int, periods, repeats: int, device: str = "cpu") -> list[dict]:
    """Rows of both parts for one model and batch size."""
    model, loss_fn, x, y = C.build(model_name, n, device=device)
    if device == "cpu":
        C.wait_quiet()
    times = C.interleaved(overhead_fns(model, loss_fn, x, y), 2 * repeats, device=device)
    rows = []
    for name in ("plain", "capture", "kfac_factors", "foof_factors"):
        rows.append(
            dict(
                part="overhead",
                model=model_name,
                N=n,
                method=name,
                time_ms=1e3 * C.median(times[name]),
                ratio_plain=C.ratio(times, name, "plain"),
            )
        )
    # components of an update
    capt = curvlab.capture(model, loss_fn, x, y, fisher="mc")
    g = capt.grad
    comp = {
        "kfac_refresh": lambda: curvlab.KFAC(curvlab.capture(model, loss_fn, x, y, fisher="mc")),
        "foof_refresh": lambda: curvlab.FOOF(
            curvlab.capture(model, loss_fn, x, y, fisher="empirical")
        ),
    }
    kfac, foof = curvlab.KFAC(capt), curvlab.FOOF(capt)
    comp["kfac_apply"] = lambda: kfac.solve(g, DAMPING)
    comp["foof_apply"] = lambda: foof.solve(g, DAMPING)
    comp["sgd_step"] = lambda: C.plain_gradient(model, loss_fn, x, y)
    if device == "cpu":
        C.wait_quiet()
    ct = C.interleaved(comp, max(2, repeats // 2), device=device)
    for name, ts in ct.items():
        rows.append(
            dict(part="component", model=model_name, N=n, method=name, time_ms=1e3 * C.median(ts))
        )
    for period in periods:
        cycles = max(1, min(repeats, 200 // period))
        per: dict[str, list[float]] = {"sgd": [], "kfac": [], "foof": []}
        if device == "cpu":
            C.wait_quiet()
        for _ in range(cycles):
            for method in per:
                per[method].append(run_cycle(method, period, model, loss_fn, x, y, device))
        sgd = C.median(per["sgd"]) / period
        kf = C.median(per["kfac"]) / period
        fo = C.median(per["foof"]) / period
        rows.append(
            dict(
                part="amortised",
                model=model_name,
                N=n,
                T=period,
                sgd_ms=1e3 * sgd,
                kfac_ms=1e3 * kf,
                foof_ms=1e3 * fo,
                kfac_vs_sgd=kf / sgd,
                foof_vs_sgd=fo / sgd,
                kfac_vs_foof=kf / fo,
            )
        )
    return rows


OVERHEAD_COLS = ["model", "N", "method", "time_ms", "ratio_plain"]
COMPONENT_COLS = ["model", "N", "method", "time_ms"]
AMORTISED_COLS = [
    "model",
    "N",
    "T",
    "sgd_ms",
    "kfac_ms",
    "foof_ms",
    "kfac_vs_sgd",
    "foof_vs_sgd",
    "kfac_vs_foof",
]


def tables(rows: list[dict]) -> str:
    out = []
    for part, cols in (
        ("overhead", OVERHEAD_COLS),
        ("component", COMPONENT_COLS),
        ("amortised", AMORTISED_COLS),
    ):
        sel = [r for r in rows if r["part"] == part]
        out.append(C.markdown_table(sel, cols))
    return "\n\n".join(out)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+")
    p.add_argument("--n", nargs="+", type=int)
    p.add_argument("--periods", nargs="+", type=int, default=[1, 10, 100])
    p.add_argument("--repeats", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="capture_overhead")
    args = p.parse_args(argv)
    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
        models, ns, repeats, periods = ["mlp-tiny", "cnn-tiny"], [32], 3, [1, 10]
    else:
        models, ns, repeats, periods = ["mlp", "cnn"], [256], 10, args.periods
    models, ns = args.models or models, args.n or ns
    repeats = args.repeats or repeats
    C.setup_torch()
    rows = []
    for model in models:
        for n in ns:
            rows += measure(model, n, periods, repeats, args.device)
            print(f"done {model} N={n}", flush=True)
    payload = dict(info=C.device_info(args.device), command=C.command_line(), rows=rows)
    path = C.save_results(args.name, payload)
    print(tables(rows))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

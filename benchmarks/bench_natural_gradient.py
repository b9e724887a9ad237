"""Q1: exact damped natural gradient, curvlab vs a plain gradient and two peers.

For each model (Benzing's MLP 784-1000-1000-1000-10 without biases, a small CNN),
batch size N and Fisher type (mc / exact / empirical) it measures, in one fresh
process per (configuration, method):

* ``plain``: forward + ``loss.backward()`` (the mini-batch gradient);
* ``curvlab``: ``curvlab.capture(..., gradient=False)`` +
  ``ExactFisher(capt).natural_gradient(λ)``; its worker also times curvlab's generic
  route ``capture`` + ``ExactFisher(capt).solve(capt.grad, λ)`` in the same rounds
  (``solve_s``, ``solve_vs_ng``) and ``natural_gradient`` after that same default
  capture (``solve_vs_ng_same``: the two routes after one kind of capture; ``solve_vs_ng``
  also includes the flat gradient that ``capture(gradient=True)`` forms);
* ``materialised``: per-column gradients via torch.func + dense Woodbury solve
  (only where ``Uᵀ`` and its Gram fit in ``--materialise-gib``);
* ``cg``: curvlinops' curvature operator + CG to a relative residual of 1e-6
  (one solve, stopped at ``--cg-time-limit`` seconds; then the ratio is a lower bound).

Peak memory = the peak-RSS (VmHWM) delta of the method's first call (see ``common.py``).
Times are medians of interleaved rounds with ``plain`` and ``curvlab`` in the same
process; ratios are medians of same-round ratios.

    python -m benchmarks.bench_natural_gradient --quick      # smoke run, seconds
    python -m benchmarks.bench_natural_gradient              # N ∈ {128, 256, 512}
    python -m benchmarks.bench_natural_gradient --full       # N up to 8192
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import common as C
from benchmarks.baselines import (
    cg_ng,
    curvlab_ng,
    curvlab_solve_ng,
    materialised_bytes,
    materialised_ng,
    relative_error,
)

METHODS = ("plain", "curvlab", "materialised", "cg")
FISHERS = ("mc", "exact", "empirical")
CLASSES = 10


def curvlab_bytes(n: int, columns: int) -> int:
    """Estimated peak of curvlab's exact NG: the float64 Gram, its Cholesky factor and
    one float64 assembly buffer (``ExactFisher``'s own budget check)."""
    rows = n * columns
    return 3 * 8 * rows * rows


def skip_reason(cfg: dict, n_params: int) -> str | None:
    """Why a configuration is not run (None: it runs); sets ``cfg["with_curvlab"]``."""
    cols = CLASSES if cfg["fisher"] == "exact" else 1
    gib = C.GiB
    need = curvlab_bytes(cfg["n"], cols)
    cfg["with_curvlab"] = need <= cfg["curvlab_gib"] * gib
    if cfg["method"] == "curvlab" and not cfg["with_curvlab"]:
        return f"skipped (needs ~{need / gib:.1f} GB)"
    if cfg["method"] == "materialised":
        need = materialised_bytes(cfg["n"], cols, n_params)
        if need > cfg["materialise_gib"] * gib:
            return f"skipped (needs {need / gib:.1f} GB)"
    if cfg["model"] == "cnn" and cfg["fisher"] == "exact" and cfg["n"] >= cfg["cnn_exact_max_n"]:
        return f"skipped (N ≥ {cfg['cnn_exact_max_n']}: minutes per solve on this CPU)"
    if cfg["method"] == "cg" and cfg["n"] > cfg["cg_max_n"]:
        return f"skipped (N > {cfg['cg_max_n']})"
    return None


# ----------------------------------------------------------------------------------
# worker (fresh process per configuration)
# ----------------------------------------------------------------------------------


def worker(cfg: dict) -> dict:
    C.setup_torch()
    import curvlab

    curvlab.config.options.memory_budget = int(cfg["curvlab_gib"] * C.GiB)
    fisher, lam, method = cfg["fisher"], cfg["damping"], cfg["method"]

    def make(n: int):
        model, loss_fn, x, y = C.build(cfg["model"], n)
        fns = {
            "plain": lambda: C.plain_gradient(model, loss_fn, x, y),
            "curvlab": lambda: curvlab_ng(model, loss_fn, x, y, fisher, lam),
            "solve": lambda: curvlab_solve_ng(model, loss_fn, x, y, fisher, lam),
            "ng_same": lambda: curvlab_ng(model, loss_fn, x, y, fisher, lam, gradient=True),
            "materialised": lambda: materialised_ng(model, loss_fn, x, y, fisher, lam),
            "cg": lambda: cg_ng(model, loss_fn, x, y, fisher, lam, time_limit=cfg["cg_time_limit"]),
        }
        return fns

    with_curvlab = cfg["with_curvlab"]
    tiny = make(4)
    for name in {"plain", method, "curvlab"}:
        tiny[name]()
    fns = make(cfg["n"])
    base = C.reset_peak_rss()
    t0 = time.perf_counter()
    result = fns[method]()
    first = time.perf_counter() - t0
    row: dict = {"peak_mib": C.peak_rss_delta(base) / C.MiB, "first_s": first}
    if method == "cg":
        result, info = result
        row.update(
            cg_iters=info["iters"], cg_residual=info["rel_residual"], cg_converged=info["converged"]
        )
    comparable = with_curvlab and not (method == "cg" and fisher == "mc")
    if method in ("materialised", "cg") and comparable:
        row["rel_err"] = relative_error(result, fns["curvlab"]())
    del result
    if method == "cg":
        timed = {"plain": fns["plain"]}
        if with_curvlab:
            timed["curvlab"] = fns["curvlab"]
        times = C.interleaved(timed, cfg["repeats"])
        row.update(
            time_s=first,
            plain_s=C.median(times["plain"]),
            ratio_plain=first / C.median(times["plain"]),
        )
        if with_curvlab:
            row.update(
                curvlab_s=C.median(times["curvlab"]), vs_curvlab=first / C.median(times["curvlab"])
            )
        return row
    timed = {"plain": fns["plain"]}
    if method != "plain" and with_curvlab:
        timed["curvlab"] = fns["curvlab"]
    if method != "plain":
        timed[method] = fns[method]
    if method == "curvlab":
        timed["solve"] = fns["solve"]
        timed["ng_same"] = fns["ng_same"]
    for name in timed:  # warm-up; the method itself was warmed by its first call
        if name != method or method == "plain":
            timed[name]()
    repeats = min(cfg["repeats"], 3) if method == "materialised" else cfg["repeats"]
    times = C.interleaved(timed, repeats, warmup=0)
    row.update(
        time_s=C.median(times[method]),
        plain_s=C.median(times["plain"]),
        ratio_plain=C.ratio(times, method, "plain"),
    )
    if "curvlab" in timed:
        row.update(
            curvlab_s=C.median(times["curvlab"]), vs_curvlab=C.ratio(times, method, "curvlab")
        )
    if "solve" in timed:
        row.update(solve_s=C.median(times["solve"]), solve_vs_ng=C.ratio(times, "solve", method))
        row["solve_vs_ng_same"] = C.ratio(times, "solve", "ng_same")
    return row


# ----------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, seconds")
    p.add_argument("--full", action="store_true", help="N up to 8192")
    p.add_argument("--models", nargs="+")
    p.add_argument("--n", nargs="+", type=int)
    p.add_argument("--fishers", nargs="+", choices=FISHERS)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--repeats", type=int)
    p.add_argument("--cg-time-limit", type=float, default=120.0)
    p.add_argument("--cg-max-n", type=int, default=2048)
    p.add_argument("--materialise-gib", type=float, default=8.0)
    p.add_argument("--curvlab-gib", type=float, default=12.0)
    p.add_argument("--cnn-exact-max-n", type=int, default=2048)
    p.add_argument("--name", default="natural_gradient")
    args = p.parse_args(argv)

    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
        models, ns, repeats = ["mlp-tiny", "cnn-tiny"], [32], 2
        args.cg_time_limit = min(args.cg_time_limit, 5.0)
    elif args.full:
        models, ns, repeats = ["mlp", "cnn"], [128, 256, 512, 2048, 8192], 5
    else:
        models, ns, repeats = ["mlp", "cnn"], [128, 256, 512], 5
    models = args.models or models
    ns = args.n or ns
    repeats = args.repeats or repeats
    fishers = args.fishers or list(FISHERS)
    methods = args.methods or list(METHODS)

    C.setup_torch()
    info = C.device_info()
    rows = []
    for model in models:
        n_params = C.num_params(C.build(model, 1)[0])
        for n in ns:
            for fisher in fishers:
                for method in methods:
                    cfg = dict(
                        model=model,
                        n=n,
                        fisher=fisher,
                        method=method,
                        damping=args.damping,
                        repeats=repeats,
                        cg_time_limit=args.cg_time_limit,
                        cg_max_n=args.cg_max_n,
                        materialise_gib=args.materialise_gib,
                        curvlab_gib=args.curvlab_gib,
                        cnn_exact_max_n=args.cnn_exact_max_n,
                    )
                    row = dict(model=model, P=n_params, N=n, fisher=fisher, method=method)
                    reason = skip_reason(cfg, n_params)
                    if reason is None:
                        row.update(C.run_configuration("benchmarks.bench_natural_gradient", cfg))
                    else:
                        row["note"] = reason
                    C.record_row(rows, row, args.name, info, COLUMNS)
    C.finish(args.name, info, rows, COLUMNS, damping=args.damping)


COLUMNS = [
    "model",
    "N",
    "fisher",
    "method",
    "time_s",
    "plain_s",
    "ratio_plain",
    "curvlab_s",
    "vs_curvlab",
    "solve_s",
    "solve_vs_ng",
    "solve_vs_ng_same",
    "peak_mib",
    "rel_err",
    "cg_iters",
    "cg_residual",
    "note",
]


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        main(sys.argv[1:])

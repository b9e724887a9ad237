"""Q4: time and peak memory of the exact natural gradient against N and width.

Benzing's MLP (``784-w-w-w-10``, no biases), MC Fisher, damping 1e-3.  Each point
runs in a fresh process (peak memory = the peak-RSS delta of the first call, see
``common.py``) and times ``plain`` and ``curvlab`` interleaved.  Writes
``benchmarks/results/<name>.json`` and the plot ``benchmarks/scaling.png``.

    python -m benchmarks.bench_scaling --quick
    python -m benchmarks.bench_scaling                     # N 64..8192, width 250..4000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import common as C
from benchmarks.baselines import curvlab_ng


def worker(cfg: dict) -> dict:
    C.setup_torch()
    import curvlab

    curvlab.config.options.memory_budget = 12 * C.GiB
    fisher, lam = cfg["fisher"], 1e-3

    def make(n: int):
        model, loss_fn, x, y = C.build("mlp", n, width=cfg["width"])
        return {
            "plain": lambda: C.plain_gradient(model, loss_fn, x, y),
            "curvlab": lambda: curvlab_ng(model, loss_fn, x, y, fisher, lam),
        }

    tiny = make(4)
    for f in tiny.values():
        f()
    fns = make(cfg["n"])
    base = C.reset_peak_rss()
    t0 = time.perf_counter()
    fns[cfg["method"]]()
    row = {"peak_mib": C.peak_rss_delta(base) / C.MiB, "first_s": time.perf_counter() - t0}
    times = C.interleaved(fns, cfg["repeats"])
    row.update(
        plain_s=C.median(times["plain"]),
        curvlab_s=C.median(times["curvlab"]),
        ratio=C.ratio(times, "curvlab", "plain"),
    )
    return row


def sweep(points: list[dict], repeats: int) -> list[dict]:
    rows = []
    for pt in points:
        for method in ("plain", "curvlab"):
            cfg = dict(pt, method=method, repeats=repeats, fisher="mc")
            C.wait_quiet()
            res = C.run_worker("benchmarks.bench_scaling", cfg)
            rows.append(dict(cfg, **res))
            print(C.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    return rows


def merge(rows: list[dict]) -> list[dict]:
    """One row per point: both methods' peaks, the times from the curvlab worker."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["sweep"], r["n"], r["width"])
        row = out.setdefault(key, dict(sweep=r["sweep"], N=r["n"], width=r["width"]))
        row[f"{r['method']}_peak_mib"] = r.get("peak_mib")
        if r["method"] == "curvlab":
            for k in ("plain_s", "curvlab_s", "ratio", "error"):
                if k in r:
                    row[k] = r[k]
    return list(out.values())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    for col, (sweep_name, xkey, xlabel) in enumerate(
        (("N", "N", "batch size N (width 1000)"), ("width", "width", "width w (N = 512)"))
    ):
        sel = sorted(
            (r for r in rows if r["sweep"] == sweep_name and "curvlab_s" in r),
            key=lambda r: r[xkey],
        )
        xs = [r[xkey] for r in sel]
        # memory growth can be 0 (nothing allocated beyond the baseline): floor for log axes
        panels = (
            ("_s", "time [s]", 0.0),
            ("_peak_mib", "peak memory above baseline [MiB]", 0.1),
        )
        for row, (suffix, ylabel, floor) in enumerate(panels):
            ax = axes[row, col]
            for method, style, label in (
                ("curvlab", "o-", "curvlab exact NG (MC)"),
                ("plain", "s--", "plain gradient"),
            ):
                ax.loglog(xs, [max(r[method + suffix], floor) for r in sel], style, label=label)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Benzing MLP 784-w-w-w-10, CPU, 2 threads")
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["sweep", "n", "width", "method", "peak_mib", "plain_s", "curvlab_s", "ratio", "error"]
MERGED = [
    "sweep",
    "N",
    "width",
    "plain_s",
    "curvlab_s",
    "ratio",
    "plain_peak_mib",
    "curvlab_peak_mib",
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--widths", nargs="+", type=int, default=[250, 500, 1000, 2000, 4000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default="scaling")
    p.add_argument("--plot", default=str(Path(__file__).resolve().parent / "scaling.png"))
    p.add_argument(
        "--replot", action="store_true", help="redraw --plot from results/<name>.json, no timing"
    )
    args = p.parse_args(argv)
    if args.replot:
        plot(
            json.loads((C.RESULTS_DIR / f"{args.name}.json").read_text())["merged"], Path(args.plot)
        )
        print(f"redrew {args.plot}")
        return
    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
        args.n, args.widths, args.repeats = [16, 32], [16, 32], 2
        args.plot = str(C.RESULTS_DIR / f"{args.name}.png")
    points = [dict(sweep="N", n=n, width=1000 if not args.quick else 32) for n in args.n]
    points += [dict(sweep="width", n=512 if not args.quick else 16, width=w) for w in args.widths]
    C.setup_torch()
    rows = sweep(points, args.repeats)
    merged = merge(rows)
    payload = dict(info=C.device_info(), command=C.command_line(), rows=rows, merged=merged)
    path = C.save_results(args.name, payload)
    plot(merged, Path(args.plot))
    print(C.markdown_table(merged, MERGED))
    print(f"\nsaved {path} and {args.plot}")


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        main(sys.argv[1:])

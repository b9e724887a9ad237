"""Q3: conv-layer Gram, location-pair sum vs per-sample-gradient Gram, and ``"auto"``.

For a 3x3 conv layer (``d_in = 9 C_in + 1`` with bias, ``d_out = C_out = C_in``) on
``H x H`` outputs (``T = H²`` locations) and ``N`` samples with one Fisher column,
it times ``curvlab.curvature.gram.layer_gram(a, e, scheme)`` for ``"pairs"`` and
``"per_sample"`` (random ``a``, ``e`` of the captured shapes), checks that both agree,
and records which one ``choose_scheme`` (``scheme="auto"``) picks and what that costs
against the faster one.  A scheme is skipped when ``scheme_costs`` predicts more than
``--max-seconds`` at the calibrated rate (then the other one is the faster by a wide
margin and is counted as the right pick).

    python -m benchmarks.bench_conv_gram --quick
    python -m benchmarks.bench_conv_gram
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from benchmarks import common as C
from curvlab.curvature.gram import choose_scheme, layer_gram, scheme_costs


def flop_rate(device: str, size: int = 1024) -> float:
    """Measured multiply-adds per second of a float32 ``size³`` matmul."""
    a = torch.randn(size, size, device=device)
    a @ a
    C.sync(device)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    C.sync(device)
    return reps * size**3 / (time.perf_counter() - t0)


def one(
    n: int, side: int, channels: int, device: str, max_seconds: float, rate: float, repeats: int
) -> dict:
    t = side * side
    d_in, d_out = 9 * channels + 1, channels
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, t, d_in, generator=gen).to(device)
    e = torch.randn(1, n, t, d_out, generator=gen).to(device)
    costs = scheme_costs(n, 1, t, d_in, d_out)
    pick = choose_scheme(n, 1, t, d_in, d_out)
    row = dict(
        N=n,
        H=side,
        T=t,
        C_in=channels,
        d_in=d_in,
        d_out=d_out,
        auto=pick,
        pred_pairs_s=costs["pairs"] / rate,
        pred_per_sample_s=costs["per_sample"] / rate,
    )
    run = {s: costs[s] / rate <= max_seconds for s in ("pairs", "per_sample")}
    funcs = {s: (lambda s=s: layer_gram(a, e, s)) for s in run if run[s]}
    times = C.interleaved(funcs, repeats, device=device) if funcs else {}
    for s in ("pairs", "per_sample"):
        row[f"{s}_s"] = C.median(times[s]) if s in times else None
    if len(times) == 2:
        ref = layer_gram(a.double(), e.double(), "per_sample")
        row["max_rel_err"] = max(
            float((layer_gram(a, e, s).double() - ref).norm() / ref.norm()) for s in times
        )
        fast = min(times, key=lambda s: row[f"{s}_s"])
        row["faster"] = fast
        row["auto_ok"] = fast == pick
        row["auto_cost"] = row[f"{pick}_s"] / row[f"{fast}_s"]
    elif len(times) == 1:
        (only,) = times
        row["faster"] = only + " (other skipped)"
        row["auto_ok"] = only == pick
        row["auto_cost"] = 1.0 if only == pick else None
    return row


COLUMNS = [
    "N",
    "H",
    "T",
    "C_in",
    "pairs_s",
    "per_sample_s",
    "faster",
    "auto",
    "auto_ok",
    "auto_cost",
    "max_rel_err",
]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", nargs="+", type=int)
    p.add_argument("--sides", nargs="+", type=int)
    p.add_argument("--channels", nargs="+", type=int)
    p.add_argument("--max-seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="conv_gram")
    args = p.parse_args(argv)
    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
        ns, sides, channels, args.max_seconds = [4, 16], [2, 8], [4, 16], 0.5
    else:
        ns, sides, channels = [8, 32, 128], [2, 4, 8, 16, 32], [8, 32, 128]
    ns, sides, channels = args.n or ns, args.sides or sides, args.channels or channels
    C.setup_torch()
    rate = flop_rate(args.device)
    rows = []
    for n, side, ch in itertools.product(ns, sides, channels):
        if args.device == "cpu":
            C.wait_quiet()
        rows.append(one(n, side, ch, args.device, args.max_seconds, rate, args.repeats))
        print(C.markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    decided = [r for r in rows if r.get("auto_ok") is not None]
    ok = sum(bool(r["auto_ok"]) for r in decided)
    worst = max((r["auto_cost"] or 1.0 for r in decided), default=1.0)
    summary = dict(
        auto_right=ok, decided=len(decided), worst_auto_slowdown=worst, rate_madds_per_s=rate
    )
    payload = dict(
        info=C.device_info(args.device), command=C.command_line(), rows=rows, summary=summary
    )
    path = C.save_results(args.name, payload)
    print(C.markdown_table(rows, COLUMNS))
    print(
        f"\nauto picked the faster scheme in {ok}/{len(decided)} configurations; "
        f"worst slowdown of the pick vs the faster: {worst:.2f}x"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main(sys.argv[1:])

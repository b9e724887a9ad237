"""GPU benchmarks in one process (one call of a lent GPU machine).

Sections (each guarded, results written as they come to ``<out>/gpu.json``):

1. ``matmul``: measured float32 matmul rates (TF32 off, torch's default), float64 and
   TF32 for reference; square 8192 and the Gram's own shape ``(4096 x 1000)(1000 x 4096)``.
2. ``gram``: Gram assembly at N = 4096 (Benzing MLP, MC, one column): per layer
   ``layer_gram`` and the network ``ExactFisher(capt).gram`` (float64 accumulation), as
   a rate of useful multiply-adds against the measured matmul rate.
3. ``full_fisher``: exact (all classes) natural gradient with N·C = 20,480 columns,
   capture included, with a breakdown (capture / Gram / Cholesky + solve).
4. ``ng``: Q1 on the GPU: plain gradient vs curvlab vs materialised per-sample
   gradients vs curvlinops + CG (when curvlinops imports).
   ``ng_paths``: curvlab's two routes to the exact natural gradient,
   ``natural_gradient(λ)`` vs ``solve(capt.grad, λ)``, against a plain gradient.
5. ``overhead``: Q2 (capture overhead of KFAC / FOOF factors, amortised updates).
6. ``conv_gram``: Q3's scheme choice on the GPU (small grid).

Peak memory = ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
above what was allocated before the call.

    python -m benchmarks.bench_gpu --out results_dir [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import curvlab
from benchmarks import common as C
from benchmarks.baselines import (
    cg_ng,
    curvlab_ng,
    curvlab_solve_ng,
    materialised_bytes,
    materialised_ng,
    relative_error,
)

DEV = "cuda"
LAM = 1e-3


def bench(f, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``f`` (CUDA events on the GPU; a CPU dry run uses the clock)."""
    for _ in range(warmup):
        f()
    if DEV != "cuda":
        return C.median(C.interleaved({"f": f}, repeats, warmup=0)["f"])
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return C.median(ts)


def peak_of(f) -> tuple[object, float | None]:
    """Result of ``f()`` and the GPU memory it needed at its peak (MiB; None on a CPU)."""
    if DEV != "cuda":
        return f(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = f()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / C.MiB


# ----------------------------------------------------------------------------------


def section_matmul(quick: bool) -> dict:
    out = {}
    shapes = {"square": (8192, 8192, 8192), "gram_4096x1000": (4096, 1000, 4096)}
    if quick:
        shapes = {"square": (1024, 1024, 1024)}
    for label, (m, k, n) in shapes.items():
        for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float64, False)):
            if tf32 and DEV != "cuda":
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(m, k, device=DEV, dtype=dtype)
            b = torch.randn(k, n, device=DEV, dtype=dtype)
            t = bench(lambda a=a, b=b: a @ b)
            name = f"{label}_{'tf32' if tf32 else str(dtype).split('.')[-1]}"
            out[name] = {"shape": [m, k, n], "seconds": t, "tflops": 2 * m * k * n / t / 1e12}
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def gram_flops(capt) -> float:
    """Useful flops of the Gram: per layer ``2 N² d_in + 2 (N C')² d_out`` (T = 1)."""
    n, c = capt.batch_size, capt.num_columns
    return sum(2 * n * n * lc.a.shape[-1] + 2 * (n * c) ** 2 * lc.e.shape[-1] for lc in capt.layers)


def section_gram(quick: bool, matmul: dict) -> dict:
    from curvlab.curvature.gram import layer_gram

    n = 512 if quick else 4096
    model, loss_fn, x, y = C.build("mlp", n, device=DEV)
    capt = curvlab.capture(model, loss_fn, x, y, fisher="mc")
    out: dict = {"N": n, "layers": []}
    for lc in capt.layers:
        t = bench(lambda lc=lc: layer_gram(lc.a, lc.e))
        fl = 2 * n * n * lc.a.shape[-1] + 2 * n * n * lc.e.shape[-1]
        # the same-shape plain matmuls, for a like-for-like rate
        aa = lc.a[:, 0]
        ee = lc.e[0, :, 0]
        t_mm = bench(lambda aa=aa, ee=ee: (aa @ aa.T, ee @ ee.T))
        out["layers"].append(
            {
                "layer": lc.name,
                "d_in": lc.a.shape[-1],
                "d_out": lc.e.shape[-1],
                "seconds": t,
                "tflops": fl / t / 1e12,
                "same_shape_matmul_tflops": fl / t_mm / 1e12,
            }
        )

    def network_gram():
        return curvlab.ExactFisher(capt).gram

    t = bench(network_gram, repeats=5)
    fl = gram_flops(capt)
    out["network"] = {"seconds": t, "tflops": fl / t / 1e12}
    ref = matmul.get("square_float32") or next(iter(matmul.values()))
    ref_gram = matmul.get("gram_4096x1000_float32", ref)
    out["matmul_tflops_square_fp32"] = ref["tflops"]
    out["matmul_tflops_gram_shape_fp32"] = ref_gram["tflops"]
    big = max(out["layers"], key=lambda r: r["d_in"] * r["d_out"])
    out["fraction_of_square_matmul_rate"] = {
        "largest_layer": big["tflops"] / ref["tflops"],
        "network": out["network"]["tflops"] / ref["tflops"],
    }
    out["fraction_of_gram_shape_matmul_rate"] = {
        "largest_layer": big["tflops"] / ref_gram["tflops"],
        "network": out["network"]["tflops"] / ref_gram["tflops"],
    }
    return out


def section_full_fisher(quick: bool) -> dict:
    n = 256 if quick else 2048
    curvlab.config.options.memory_budget = 60 * C.GiB
    model, loss_fn, x, y = C.build("mlp", n, device=DEV)

    def end_to_end():
        capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
        return curvlab.ExactFisher(capt).solve(capt.grad, LAM)

    end_to_end()
    _, peak = peak_of(end_to_end)
    total = bench(end_to_end, repeats=5, warmup=1)
    capt = curvlab.capture(model, loss_fn, x, y, fisher="exact")
    t_capture = bench(lambda: curvlab.capture(model, loss_fn, x, y, fisher="exact"), 5, 1)
    t_gram = bench(lambda: curvlab.ExactFisher(capt).gram, 5, 1)
    fisher = curvlab.ExactFisher(capt)
    _ = fisher.gram
    # drop the cached Cholesky factor so that every call factorises again
    t_solve = bench(lambda: (setattr(fisher, "_factor", None), fisher.solve(capt.grad, LAM)), 5, 1)
    t_plain = bench(lambda: C.plain_gradient(model, loss_fn, x, y))
    return {
        "N": n,
        "columns": n * capt.num_columns,
        "seconds": total,
        "capture_s": t_capture,
        "gram_s": t_gram,
        "cholesky_and_solve_s": t_solve,
        "plain_gradient_s": t_plain,
        "peak_mib": peak,
        "target_s": 2.0,
        "met": total < 2.0,
    }


def section_ng(quick: bool, have_curvlinops: bool) -> list[dict]:
    curvlab.config.options.memory_budget = 60 * C.GiB
    rows = []
    models = ["mlp-tiny"] if quick else ["mlp", "cnn"]
    ns = [64] if quick else [128, 512, 2048, 8192]
    for name in models:
        for n in ns:
            for fisher in ("mc", "exact", "empirical"):
                cols = 10 if fisher == "exact" else 1
                if 4 * 8 * (n * cols) ** 2 > 60 * C.GiB:
                    rows.append(
                        dict(
                            model=name,
                            N=n,
                            fisher=fisher,
                            note=f"skipped (Gram needs {32 * (n * cols) ** 2 / 2**30:.0f} GB)",
                        )
                    )
                    continue
                model, loss_fn, x, y = C.build(name, n, device=DEV)
                fns = {
                    "plain": lambda m=model, lf=loss_fn, x=x, y=y: C.plain_gradient(m, lf, x, y),
                    "curvlab": lambda m=model, lf=loss_fn, x=x, y=y, f=fisher: curvlab_ng(
                        m, lf, x, y, f, LAM
                    ),
                }
                fns["curvlab"]()
                ref, peak_c = peak_of(fns["curvlab"])
                _, peak_p = peak_of(fns["plain"])
                times = C.interleaved(fns, 7, warmup=1, device=DEV)
                row = dict(
                    model=name,
                    N=n,
                    fisher=fisher,
                    P=C.num_params(model),
                    plain_s=C.median(times["plain"]),
                    curvlab_s=C.median(times["curvlab"]),
                    ratio_plain=C.ratio(times, "curvlab", "plain"),
                    plain_peak_mib=peak_p,
                    curvlab_peak_mib=peak_c,
                )
                need = materialised_bytes(n, cols, row["P"])
                if need <= 24 * C.GiB:

                    def mat(m=model, lf=loss_fn, x=x, y=y, f=fisher):
                        return materialised_ng(m, lf, x, y, f, LAM)

                    res, row["materialised_peak_mib"] = peak_of(mat)
                    row["materialised_rel_err"] = relative_error(res, ref)
                    del res
                    tm = C.interleaved(
                        {"curvlab": fns["curvlab"], "mat": mat}, 3, warmup=0, device=DEV
                    )
                    row["materialised_s"] = C.median(tm["mat"])
                    row["materialised_vs_curvlab"] = C.ratio(tm, "mat", "curvlab")
                else:
                    row["materialised_note"] = f"skipped (needs {need / C.GiB:.0f} GB)"
                if have_curvlinops and n <= 512 and not (name == "cnn" and n > 128):
                    C.sync(DEV)
                    t0 = time.perf_counter()
                    sol, info = cg_ng(model, loss_fn, x, y, fisher, LAM, time_limit=10.0)
                    C.sync(DEV)
                    row["cg_s"] = time.perf_counter() - t0
                    row.update(
                        cg_iters=info["iters"],
                        cg_residual=info["rel_residual"],
                        cg_converged=info["converged"],
                    )
                    row["cg_vs_curvlab"] = row["cg_s"] / row["curvlab_s"]
                    if fisher != "mc":
                        row["cg_rel_err"] = relative_error(sol, ref)
                del ref
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model, x, y, fns
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return rows


def section_ng_paths(quick: bool) -> list[dict]:
    """``capture(gradient=False)`` + ``natural_gradient`` vs ``capture`` + ``solve``."""
    curvlab.config.options.memory_budget = 60 * C.GiB
    rows = []
    cases = (
        [("mlp-tiny", 64, "mc")]
        if quick
        else [
            ("mlp", 256, "mc"),
            ("mlp", 256, "empirical"),
            ("mlp", 2048, "mc"),
            ("mlp", 8192, "mc"),
            ("mlp", 2048, "exact"),
            ("cnn", 2048, "mc"),
        ]
    )
    for name, n, fisher in cases:
        model, loss_fn, x, y = C.build(name, n, device=DEV)
        fns = {
            "plain": lambda m=model, lf=loss_fn, x=x, y=y: C.plain_gradient(m, lf, x, y),
            "solve": lambda m=model, lf=loss_fn, x=x, y=y, f=fisher: curvlab_solve_ng(
                m, lf, x, y, f, LAM
            ),
            "natural_gradient": lambda m=model, lf=loss_fn, x=x, y=y, f=fisher: curvlab_ng(
                m, lf, x, y, f, LAM
            ),
        }
        for f in fns.values():
            f()
        peaks = {k: peak_of(f)[1] for k, f in fns.items()}
        times = C.interleaved(fns, 7, warmup=0, device=DEV)
        rows.append(
            dict(
                model=name,
                N=n,
                fisher=fisher,
                **{f"{k}_s": C.median(v) for k, v in times.items()},
                **{f"{k}_peak_mib": v for k, v in peaks.items()},
                solve_vs_plain=C.ratio(times, "solve", "plain"),
                ng_vs_plain=C.ratio(times, "natural_gradient", "plain"),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section_overhead(quick: bool) -> list[dict]:
    from benchmarks.bench_capture_overhead import measure

    rows = []
    models = ["mlp-tiny"] if quick else ["mlp", "cnn"]
    ns = [64] if quick else [256, 2048]
    for name in models:
        for n in ns:
            rows += measure(name, n, [1, 10, 100], 10, device=DEV)
    return rows


def section_conv_gram(quick: bool) -> dict:
    from benchmarks.bench_conv_gram import flop_rate, one

    rate = flop_rate(DEV, 4096)
    rows = []
    ns = [8] if quick else [8, 32, 128]
    sides = [4] if quick else [2, 4, 8, 16, 32]
    chans = [8] if quick else [8, 32, 128]
    for n in ns:
        for side in sides:
            for ch in chans:
                rows.append(one(n, side, ch, DEV, 0.2, rate, 3))
    decided = [r for r in rows if r.get("auto_ok") is not None]
    return {
        "rows": rows,
        "auto_right": sum(bool(r["auto_ok"]) for r in decided),
        "decided": len(decided),
        "worst_auto_slowdown": max((r["auto_cost"] or 1 for r in decided), default=1),
    }


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(C.RESULTS_DIR))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the code paths")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["matmul", "gram", "full_fisher", "ng", "ng_paths", "overhead", "conv_gram"],
    )
    args = p.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cpu":
        C.setup_torch()
    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    try:
        import curvlinops  # noqa: F401

        have_curvlinops = True
    except ImportError:
        have_curvlinops = False
    payload: dict = {
        "info": C.device_info(DEV),
        "command": C.command_line(),
        "curvlab_file": curvlab.__file__,
        "curvlinops": have_curvlinops,
        "cuda": torch.version.cuda,
    }
    print(json.dumps(payload["info"]), flush=True)
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            if name == "matmul":
                payload[name] = section_matmul(args.quick)
            elif name == "gram":
                payload[name] = section_gram(args.quick, payload.get("matmul", {}))
            elif name == "full_fisher":
                payload[name] = section_full_fisher(args.quick)
            elif name == "ng":
                payload[name] = section_ng(args.quick, have_curvlinops)
            elif name == "ng_paths":
                payload[name] = section_ng_paths(args.quick)
            elif name == "overhead":
                payload[name] = section_overhead(args.quick)
            elif name == "conv_gram":
                payload[name] = section_conv_gram(args.quick)
        except Exception:  # keep the other sections' results
            payload[name] = {"error": traceback.format_exc()}
        payload.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        C.save_results("gpu", payload, out_dir)
        summary = payload[name]
        text = json.dumps(summary, default=str)
        print(f"== {name} ({payload['section_seconds'][name]:.1f} s): {text[:3000]}", flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])

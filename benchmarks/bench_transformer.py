"""Q6: exact natural gradient of a GPT-style language model with the MC Fisher.

The model is curvlab's built-in causal transformer (``curvlab.transformer.TransformerLM``:
token and position embeddings, pre-LayerNorm blocks, causal SDPA, GELU MLP, Linear head)
at GPT scale: 6 blocks, width 256, 8 heads, sequence length 128, a byte vocabulary of
256 (the text uses its ASCII half; 256 ≠ 128 positions keeps the class dimension
unambiguous, see ``curvlab.losses.check_targets``), about 4.9M parameters.  Inputs are
real text windows (``curvlab.text``, the Python standard library's own sources),
targets the next bytes, token-level cross-entropy (mean over positions).  For N
sequences it measures, each configuration in a fresh process (timing and peak-memory
protocol of ``common.py``):

* ``plain``: forward + ``loss.backward()``;
* ``curvlab``: ``capture(fisher="mc", gradient=False)`` + ``ExactFisher.natural_gradient(λ)``
  (one sampled label per position, one Fisher column per sequence); its worker also
  times ``solve(capt.grad, λ)``;
* ``materialised``: per-sequence gradients materialised with torch.func (same sampled
  labels), then the dense Woodbury solve; ``rel_err`` against curvlab's result;
* ``cg``: curvlinops' ``GGNLinearOperator`` (the exact GGN; forward-mode AD, so under the
  math attention kernel) + CG on ``(G + λI) x = g`` to a relative residual of 1e-6,
  stopped at ``--cg-time-limit`` seconds (then its ratio is a lower bound).  The exact
  GGN is what the MC Fisher estimates; curvlab's own exact-GGN route would need
  ``N·T·V`` Gram columns (262,144 at N = 8), far beyond memory, which is why the MC
  Fisher is the natural-gradient route for language models.

    python -m benchmarks.bench_transformer --quick   # tiny model, seconds
    python -m benchmarks.bench_transformer           # ~4.9M parameters, N ∈ {8, 32}
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import Tensor, nn

from benchmarks import common as C
from benchmarks.baselines import (
    cg_ng,
    curvlab_ng,
    curvlab_solve_ng,
    materialised_bytes,
    materialised_ng,
    relative_error,
)

BYTES = 256
METHODS = ("plain", "curvlab", "materialised", "cg")
SIZES = {
    "gpt": dict(width=256, depth=6, heads=8, seq_len=128),
    "gpt-tiny": dict(width=32, depth=2, heads=2, seq_len=16),
}


class ClassesFirst(nn.Module):
    """The LM with cross-entropy classes at dim 1, the layout curvlinops' loss call reads."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).movedim(-1, 1)


def build(size: str, n: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Model, loss, the first ``n`` training windows and their next-byte targets."""
    from curvlab.text import text_windows
    from curvlab.transformer import TransformerLM

    s = SIZES[size]
    torch.manual_seed(seed)
    model = TransformerLM(BYTES, s["seq_len"], s["width"], s["depth"], s["heads"])
    x, y = text_windows("train", seq_len=s["seq_len"])
    return model, nn.CrossEntropyLoss(), x[:n], y[:n]


def cg_ggn(model, loss_fn, x, y, damping: float, time_limit: float) -> tuple[Tensor, dict]:
    """curvlinops GGN + CG under the math attention kernel (forward-mode AD needs it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return cg_ng(ClassesFirst(model), loss_fn, x, y, "exact", damping, time_limit=time_limit)


def worker(cfg: dict) -> dict:
    C.setup_torch()
    import curvlab

    curvlab.config.options.memory_budget = int(cfg["curvlab_gib"] * C.GiB)
    lam, method = cfg["damping"], cfg["method"]

    def make(n: int):
        model, loss_fn, x, y = build(cfg["size"], n)
        return {
            "plain": lambda: C.plain_gradient(model, loss_fn, x, y),
            "curvlab": lambda: curvlab_ng(model, loss_fn, x, y, "mc", lam),
            "solve": lambda: curvlab_solve_ng(model, loss_fn, x, y, "mc", lam),
            "materialised": lambda: materialised_ng(model, loss_fn, x, y, "mc", lam),
            "cg": lambda: cg_ggn(model, loss_fn, x, y, lam, cfg["cg_time_limit"]),
        }

    tiny = make(2)
    for name in {"plain", "curvlab", method}:
        if name != "cg":
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
    elif method == "materialised":
        row["rel_err"] = relative_error(result, fns["curvlab"]())
    del result
    timed = {"plain": fns["plain"], "curvlab": fns["curvlab"]}
    if method == "curvlab":
        timed["solve"] = fns["solve"]
    elif method == "materialised":
        timed["materialised"] = fns["materialised"]
    repeats = 3 if method in ("materialised", "cg") else cfg["repeats"]
    times = C.interleaved(timed, repeats, warmup=1)
    plain_s, curvlab_s = C.median(times["plain"]), C.median(times["curvlab"])
    row.update(plain_s=plain_s, curvlab_s=curvlab_s)
    if method == "cg":  # one solve is minutes: its single timing against the medians
        row.update(time_s=first, ratio_plain=first / plain_s, vs_curvlab=first / curvlab_s)
    else:
        row.update(
            time_s=C.median(times[method]),
            ratio_plain=C.ratio(times, method, "plain"),
            vs_curvlab=C.ratio(times, method, "curvlab"),
        )
    if method == "curvlab":
        row.update(solve_s=C.median(times["solve"]), solve_vs_ng=C.ratio(times, "solve", "curvlab"))
    return row


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, N = 4, seconds")
    p.add_argument("--n", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cg-time-limit", type=float, default=300.0)
    p.add_argument("--materialise-gib", type=float, default=8.0)
    p.add_argument("--curvlab-gib", type=float, default=12.0)
    p.add_argument("--name")
    args = p.parse_args(argv)
    size = "gpt-tiny" if args.quick else "gpt"
    ns = args.n or ([4] if args.quick else [8, 32])
    if args.quick:
        C.QUIET_MAX_WAIT = 0.0
        args.repeats, args.cg_time_limit = 2, min(args.cg_time_limit, 5.0)
    name = args.name or ("transformer_quick" if args.quick else "transformer")

    C.setup_torch()
    info = C.device_info()
    n_params = C.num_params(build(size, 1)[0])
    rows = []
    for n in ns:
        for method in args.methods or METHODS:
            row = dict(model=size, P=n_params, N=n, method=method)
            need = materialised_bytes(n, 1, n_params)
            if method == "materialised" and need > args.materialise_gib * C.GiB:
                row["note"] = f"skipped (needs {need / C.GiB:.1f} GB)"
            else:
                cfg = dict(
                    size=size,
                    n=n,
                    method=method,
                    damping=args.damping,
                    repeats=args.repeats,
                    cg_time_limit=args.cg_time_limit,
                    curvlab_gib=args.curvlab_gib,
                )
                row.update(C.run_configuration("benchmarks.bench_transformer", cfg))
            C.record_row(rows, row, name, info, COLUMNS)
    C.finish(name, info, rows, COLUMNS, damping=args.damping)


COLUMNS = [
    "model",
    "P",
    "N",
    "method",
    "time_s",
    "plain_s",
    "ratio_plain",
    "curvlab_s",
    "vs_curvlab",
    "solve_vs_ng",
    "peak_mib",
    "rel_err",
    "cg_iters",
    "cg_residual",
    "note",
]


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        main(sys.argv[1:])

"""Shared pieces of the benchmark scripts: models, timing, peak memory, tables.

Timing: every comparison is timed *interleaved* in one process (round-robin over the
methods, ``repeats`` rounds after a warm-up call each), and a ratio is the median over
rounds of ``t_method / t_reference`` measured in the same round, so that slow drifts
in machine load cancel.  CPU runs use ``torch.set_num_threads(2)``.

Peak memory on the CPU: each configuration runs in a fresh subprocess
(``python -m benchmarks.<script> --worker '<json>'``).  After imports, model and data
creation and a warm-up on a tiny batch, the worker resets the kernel's resident-set
high-water mark (``echo 5 > /proc/self/clear_refs``) and takes the current ``VmRSS`` as
the baseline; it then runs the method once and reports ``VmHWM - baseline``: the extra
resident memory the method needed at its peak (:func:`reset_peak_rss`).  tracemalloc
does not see torch's allocations, so RSS is the honest measure.  On a GPU,
peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
THREADS = 2
QUIET_MAX_WAIT = 20.0  # seconds wait_quiet waits at most; the --quick runs set 0
MiB = 2**20
GiB = 2**30


# ----------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------


def setup_torch(threads: int = THREADS) -> None:
    """Fix the CPU thread count (the documented 2 threads) and seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_info(device: torch.device | str = "cpu") -> dict:
    """What the results were measured on."""
    device = torch.device(device)
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
    try:
        info["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------


def benzing_mlp(
    width: int = 1000, depth: int = 3, d_in: int = 784, classes: int = 10, bias: bool = False
) -> nn.Sequential:
    """The MLP of Benzing (2022): ``784-1000-1000-1000-10``, ReLU, no biases."""
    dims = [d_in] + [width] * depth + [classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < depth:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn(channels: Sequence[int] = (32, 64), image: int = 28, classes: int = 10):
    """``Conv(1,c1,3,p1)-ReLU-MaxPool2-Conv(c1,c2,3,p1)-ReLU-MaxPool2-Flatten-Linear``."""
    c1, c2 = channels
    side = image // 4
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, classes),
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, the identity (or a strided 1x1 conv-BN
    projection) added, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.shortcut(x) + self.bn2(self.conv2(h)))


def resnet_cnn(widths: Sequence[int] = (64, 128, 256, 512), classes: int = 10) -> nn.Module:
    """A ResNet-18-width CNN for 1x28x28 inputs, in eval mode: stem ``Conv(1, w0, 3)-BN-
    ReLU``, one basic block per width (stride 2 from the second on), global average
    pooling, ``Linear(w_last, classes)``."""
    blocks: list[nn.Module] = [
        nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    for i, w in enumerate(widths):
        blocks.append(BasicBlock(widths[max(i - 1, 0)], w, stride=1 if i == 0 else 2))
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes)]
    return nn.Sequential(*blocks).eval()


MODEL_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": benzing_mlp,
    "cnn": small_cnn,
    "mlp-tiny": lambda: benzing_mlp(width=32, depth=2),
    "cnn-tiny": lambda: small_cnn(channels=(4, 8)),
    "resnet": resnet_cnn,
    "resnet-tiny": lambda: resnet_cnn(widths=(4, 8)),
}


def build(name: str, n: int, device: str = "cpu", seed: int = 0, **kwargs):
    """Model, loss, inputs and labels of a benchmark problem (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    builder = MODEL_BUILDERS[name]
    model = builder(**kwargs) if kwargs else builder()
    model = model.to(device)
    shape = (784,) if name.startswith("mlp") else (1, 28, 28)
    x = torch.randn(n, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    return model, nn.CrossEntropyLoss(), x, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plain_gradient(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The reference: one forward and ``loss.backward()``; returns the flat gradient.

    The loss is curvlab's (``curvlab.losses.loss_value``: token-level cross-entropy reads
    classes last), the same that ``capture`` differentiates."""
    from curvlab.losses import loss_value

    for p in model.parameters():
        p.grad = None
    loss_value(loss_fn, model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------


def interleaved(
    funcs: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    time_limit: float | None = None,
) -> dict[str, list[float]]:
    """Round-robin timing: ``warmup`` untimed calls each, then ``repeats`` rounds.

    Stops early (after at least one timed round) once ``time_limit`` seconds are spent.
    """
    for f in funcs.values():
        for _ in range(warmup):
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in funcs}
    start = time.perf_counter()
    for _ in range(repeats):
        for name, f in funcs.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``t_num / t_den`` (same-round pairs)."""
    return median([a / b for a, b in zip(times[num], times[den])])


# ----------------------------------------------------------------------------------
# peak memory in fresh subprocesses
# ----------------------------------------------------------------------------------


def maxrss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Start a peak-memory measurement; returns the baseline in bytes.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the high-water mark
    ``VmHWM`` to the current ``VmRSS``, so the later peak is measured from here even if
    setup once used more.  Elsewhere falls back to ``ru_maxrss`` (then the delta is a
    lower bound: it misses peaks below an earlier high-water mark).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    return maxrss_bytes()


def peak_rss_delta(base: int) -> int:
    """Bytes of resident memory above ``base`` at the peak since :func:`reset_peak_rss`."""
    hwm = _status_kib("VmHWM")
    return (hwm * 1024 if hwm is not None else maxrss_bytes()) - base


def available_bytes() -> int:
    """Memory the OS reports available now."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 8 * GiB


def wait_quiet(threshold: float = 15.0, max_wait: float | None = None) -> float:
    """Wait until other processes use less than ``threshold`` % of the CPUs (sampled
    over half a second) or ``max_wait`` seconds (default ``QUIET_MAX_WAIT``) pass;
    returns the last reading (recorded as ``cpu_busy_pct``).  The machine is shared, so
    each configuration starts on a quiet machine where possible; the wait is short
    because the results rely on ratios timed interleaved in one process, not on
    absolute times."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return float("nan")
    max_wait = QUIET_MAX_WAIT if max_wait is None else max_wait
    start = time.perf_counter()
    busy = psutil.cpu_percent(interval=0.5)
    while busy > threshold and time.perf_counter() - start < max_wait:
        time.sleep(2.0)
        busy = psutil.cpu_percent(interval=0.5)
    return busy


def run_worker(module: str, config: dict, timeout: float = 1800.0) -> dict:
    """Run ``python -m module --worker <config>`` in a fresh process; its JSON result."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(config)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}


def run_configuration(module: str, config: dict) -> dict:
    """:func:`wait_quiet`, then :func:`run_worker`; a worker's error becomes the ``note``."""
    row = {"cpu_busy_pct": wait_quiet()}
    row.update(run_worker(module, config))
    if "error" in row:
        row["note"] = row.pop("error")
    return row


def worker_entry(argv: Sequence[str], fn: Callable[[dict], dict]) -> bool:
    """If ``argv`` asks for worker mode, run ``fn(config)``, print its result, return True."""
    if len(argv) >= 2 and argv[0] == "--worker":
        result = fn(json.loads(argv[1]))
        print("RESULT " + json.dumps(result), flush=True)
        return True
    return False


# ----------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------


def fmt(x: object, digits: int = 3) -> str:
    """Compact table cell."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def save_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` (with the device info) to ``<out_dir>/<name>.json``."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def record_row(rows: list[dict], row: dict, name: str, info: dict, columns: Sequence[str]) -> None:
    """Append ``row``, print it as a table line and save the rows so far (a long run
    keeps what it measured if it is stopped)."""
    rows.append(row)
    print(markdown_table([row], columns).splitlines()[-1], flush=True)
    save_results(name, dict(info=info, command=command_line(), rows=rows))


def finish(name: str, info: dict, rows: list[dict], columns: Sequence[str], **extra) -> None:
    """Save the final payload (``extra`` beside the rows), print the whole table and where
    it was saved."""
    path = save_results(name, dict(info=info, command=command_line(), **extra, rows=rows))
    print()
    print(markdown_table(rows, columns))
    print(f"\nsaved {path}")


def command_line() -> str:
    """The command that is running, for the records."""
    return " ".join(["python -m", "benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])

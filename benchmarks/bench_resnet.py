"""Q5: exact natural gradient on a ResNet-18-width CNN with eval BatchNorm.

The model (``common.resnet_cnn``: stem conv-BN, one basic block per width 64, 128, 256,
512, global average pooling, a linear classifier; 1x28x28 inputs) has conv layers
(Kronecker kinds), BatchNorm layers (read through their per-sample gradients) and
strided 1x1 projection shortcuts.  For N = 64 and 256 and the MC and empirical Fisher,
one run of :mod:`benchmarks.bench_natural_gradient`'s workers measures curvlab's
``capture(..., gradient=False)`` + ``ExactFisher.natural_gradient(λ)`` against a plain
gradient, per-sample gradient materialisation (torch.func) + dense Woodbury solve, and
curvlinops' curvature operator + CG (same timing and memory protocol, ``common.py``).

    python -m benchmarks.bench_resnet --quick    # tiny widths, N = 16: a smoke run
    python -m benchmarks.bench_resnet            # the ResNet-18-width CNN, N ∈ {64, 256}
"""

from __future__ import annotations

import sys

from benchmarks import bench_natural_gradient
from benchmarks import common as C


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    rest = [a for a in argv if a != "--quick"]
    defaults = ["--models", "resnet-tiny" if quick else "resnet"]
    defaults += ["--n", *(["16"] if quick else ["64", "256"])]
    defaults += ["--fishers", "mc", "empirical", "--name", "resnet_quick" if quick else "resnet"]
    if quick:
        C.QUIET_MAX_WAIT = 0.0
        defaults += ["--repeats", "2", "--cg-time-limit", "5"]
    bench_natural_gradient.main([*defaults, *rest])


if __name__ == "__main__":
    main(sys.argv[1:])

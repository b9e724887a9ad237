"""The ``curvlab`` command line (console script ``curvlab``, or ``python -m curvlab.cli``).

* :mod:`curvlab.cli.commands`: the parser, ``curvlab list`` and :func:`main`;
* :mod:`curvlab.cli.compare`: ``compare`` / ``spectra`` / ``damping`` / ``kfc``;
* :mod:`curvlab.cli.train`: ``train``;
* :mod:`curvlab.cli.common`: option checks and the run-and-report step they share.

Reports are rendered by :mod:`curvlab.report`.
"""

from curvlab.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]

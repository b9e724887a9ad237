"""The report writer: renders records (and figures) into a report folder; computes nothing.

:func:`write_report` writes ``report.md``, a self-contained ``report.html``,
``results.json``, ``results.csv`` and ``figures/``; :func:`load_results` reads
``results.json`` back.
"""

from curvlab.report.results import load_results
from curvlab.report.writer import write_report

__all__ = ["load_results", "write_report"]

"""Timing and memory benchmarks for curvlab (run as ``python -m benchmarks.<script>``).

Results, devices, dates and commands are recorded in ``benchmarks/RESULTS.md``.
"""

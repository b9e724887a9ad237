"""Execute every notebook in ``notebooks/`` in small mode; any cell error fails the test.

Each notebook runs in a fresh ``python3`` kernel with ``CURVLAB_NOTEBOOK_SMALL=1`` (tiny
settings, a few seconds to ~40 s each on two cores) in a temporary working directory,
so nothing is written into the repository: the stored notebooks keep the outputs of
their full-mode run.  The kernel is ipykernel's native
``python3`` kernel: jupyter_client starts it with ``sys.executable``, i.e. the
interpreter running the tests (the project's virtual environment).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# nbclient, nbformat and ipykernel are in the [test] extra: a missing one is an error.
import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; small mode needs a few seconds per cell


EXPECTED = {"01_tour", "02_benzing2022", "03_two_level_kfac", "04_kfc_checks", "05_transformer"}
"""Notebooks the tests below must find (stored full-mode run, small-mode execution)."""


def test_notebooks_exist():
    """The suite would silently test nothing without notebooks."""
    missing = EXPECTED - {p.stem for p in NOTEBOOKS}
    assert not missing, f"expected the notebooks {sorted(missing)} in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_with_outputs(path: Path):
    """Notebooks are stored executed (full mode), so figures and tables show when opened:
    every code cell ran, in order, without an error, and some cell shows a figure."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: cells not executed; run it in full mode"
    assert counts == sorted(counts), f"{path.name}: cells executed out of order"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name}: error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no figure"
    small = [o for o in outputs if "SMALL=True" in o.get("text", "")]
    assert not small, f"{path.name}: stored from a small-mode run"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CURVLAB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel must import this checkout's curvlab even from a temporary directory.
    root = str(NOTEBOOK_DIR.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    stored = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    # One extra cell reports the kernel's interpreter: it must be this environment's.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    assert path.read_bytes() == stored, f"{path.name}: the small-mode run rewrote the stored file"
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert printed == sys.prefix, (
        f"the kernel ran in the environment {printed!r}, not in this one ({sys.prefix!r})"
    )

"""Execute every notebook in ``notebooks/`` in small mode; any cell error fails the test.

Each notebook runs in a fresh ``python3`` kernel with ``CURVLAB_NOTEBOOK_SMALL=1`` (tiny
settings, a few seconds to ~40 s each on two cores) in a temporary working directory,
so nothing is written into the repository.  The kernel is ipykernel's native
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


def test_notebooks_exist():
    """The suite would silently test nothing without notebooks."""
    assert len(NOTEBOOKS) >= 4, f"expected the issue's notebooks in {NOTEBOOK_DIR}"


def test_notebooks_saved_without_outputs():
    """Notebooks are committed without outputs (the repository stays small)."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        with_output = [
            i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("outputs")
        ]
        assert not with_output, f"{path.name}: cells {with_output} have outputs; clear them"


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
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert printed == sys.prefix, (
        f"the kernel ran in the environment {printed!r}, not in this one ({sys.prefix!r})"
    )

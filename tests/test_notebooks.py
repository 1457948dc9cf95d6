"""Execute every notebook under notebooks/ in a fresh kernel; their assert cells are the checks.

Notebooks are committed with outputs stripped (see notebooks/README.md), so the numbers a reader sees
are always produced by the current code; ``test_committed_without_outputs`` keeps it that way.
"""

import pathlib
import sys

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 600


def test_notebooks_found():
    names = {path.name for path in NOTEBOOKS}
    assert {"01_stop_gradient_bias.ipynb", "02_estimator_variance.ipynb"} <= names, names


def test_kernel_runs_this_interpreter():
    # ipykernel installs its "python3" spec into sys.prefix; jupyter_client swaps a bare "python"
    # argv[0] for sys.executable, so the notebooks see the same environment as the tests.
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert spec.argv[0] in {"python", "python3", f"python3.{sys.version_info[1]}", sys.executable}, spec.argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [
        i for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell (a failed assert included)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

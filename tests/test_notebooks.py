"""Execute every notebook under notebooks/ in a fresh kernel; their assert cells are the checks.

Notebooks are committed with outputs stripped (see notebooks/README.md), so the numbers a reader sees
are always produced by the current code; ``test_committed_without_outputs`` keeps it that way.
"""

import json
import pathlib
import shutil
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
def test_notebook_runs(path, monkeypatch):
    # The kernel inherits the environment: notebooks read the committed records, never a runs/ folder
    # that the user's own `opd-jax demo` left in the working tree (the README's two commands, in either order).
    monkeypatch.setenv("OPD_JAX_RECORDED_ONLY", "1")
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


def test_toy_notebook_reads_a_fresh_demo_only_outside_the_tests_and_checks_the_committed_records(tmp_path,
                                                                                                   monkeypatch):
    """Notebook 03's record cells on a copy of the repository with a decoy ``runs/demo/`` whose numbers
    break every claim: under the tests' ``OPD_JAX_RECORDED_ONLY=1`` they read the committed records; for
    a user they show the fresh run but still check the committed records."""
    repo = NOTEBOOK_DIR.parent
    notebook = nbformat.read(NOTEBOOK_DIR / "03_toy_distillation.ipynb", as_version=4)
    load, check = (next(c.source for c in notebook.cells if c.cell_type == "code" and marker in c.source)
                   for marker in ("RESULTS =", "claims hold"))
    root = tmp_path / "repo"
    (root / "experiments" / "results" / "demo").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    shutil.copy(repo / "experiments" / "results" / "demo" / "results.json", root / "experiments" / "results" / "demo")
    decoy = json.loads((repo / "experiments" / "results" / "demo" / "results.json").read_text())
    for record in decoy["summary"]:
        record["accuracy"] = 0.0
    (root / "runs" / "demo").mkdir(parents=True)
    (root / "runs" / "demo" / "results.json").write_text(json.dumps(decoy))
    monkeypatch.chdir(root)
    for recorded_only, shown in (("1", root / "experiments" / "results" / "demo"), ("0", root / "runs" / "demo")):
        monkeypatch.setenv("OPD_JAX_RECORDED_ONLY", recorded_only)
        namespace: dict = {}
        exec(load, namespace)  # noqa: S102 - the notebook's own cell
        assert namespace["RESULTS"] == shown
        exec(check, namespace)  # noqa: S102 - passes on the committed records beside the decoy


def test_the_readmes_strip_command_works_with_what_the_bootstrap_installs(tmp_path):
    """notebooks/README.md's command to strip outputs needs only the venv's nbformat (no jupyter), and
    leaves a notebook that test_committed_without_outputs accepts; every command it names is in the
    venv or is the pip install it asks for."""
    import re
    import subprocess

    text = (NOTEBOOK_DIR / "README.md").read_text()
    (command,) = re.findall(r"`(\.venv/bin/python notebooks/strip_outputs\.py [^`]*)`", text)
    assert "jupyter nbconvert" not in text
    notebook = nbformat.read(NOTEBOOK_DIR / "01_stop_gradient_bias.ipynb", as_version=4)
    code = next(c for c in notebook.cells if c.cell_type == "code")
    code.outputs, code.execution_count = [nbformat.v4.new_output("stream", text="stale\n")], 3
    copy = tmp_path / "NAME.ipynb"
    nbformat.write(notebook, copy)
    argv = command.replace(".venv/bin/python", sys.executable).replace("notebooks/NAME.ipynb", str(copy)).split()
    argv[1] = str(NOTEBOOK_DIR / "strip_outputs.py")
    assert subprocess.run(argv, capture_output=True, text=True, timeout=120).returncode == 0
    stripped = nbformat.read(copy, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in stripped.cells if c.cell_type == "code")
    assert [c.source for c in stripped.cells] == [c.source for c in notebook.cells]
    for tool in re.findall(r"`\.venv/bin/(\w+)", text):
        assert tool in {"python", "pip", "jupyter"}, tool  # jupyter only after the pip install it asks for

"""Strip the outputs and execution counts of notebooks, in place, before committing them.

Usage: ``.venv/bin/python notebooks/strip_outputs.py notebooks/NAME.ipynb [...]``. It needs only
nbformat, which ``.ci/bootstrap`` installs (the test extra); no Jupyter front end.
"""

import sys

import nbformat


def strip(path: str) -> bool:
    """Clear ``path``'s code cells' outputs and counts; whether anything changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(notebook, path)
    return changed


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        print(f"{name}: {'stripped' if strip(name) else 'no outputs'}")

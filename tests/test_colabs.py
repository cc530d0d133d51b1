"""Every notebook in colabs/ runs top to bottom in a real Jupyter kernel (nbclient).

The test is generic: a notebook checks its own results with ``assert`` in its
cells, and any error fails the test with the cell that raised. Notebooks are
committed with the outputs of a real run so that they read on GitHub without
running; to refresh them after editing a notebook:

    JAXFER_WRITE_COLABS=1 python -m pytest -q tests/test_colabs.py

The suite runs each notebook with ``JAXFER_COLAB_SMALL=1`` in the kernel's
environment: a notebook reads it to shrink its data and steps (a small subset,
the same code path) so the suite stays short; refreshing the committed outputs
runs the full-size notebook (the variable is not set then).
"""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
CELL_TIMEOUT_S = 900


def test_there_are_colabs():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_colab_is_committed_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), \
        f"{os.path.basename(path)} has cells that never ran: refresh it (see this module's docstring)"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_colab_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # the kernel imports this checkout's jaxfer and runs in a scratch folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if not os.environ.get("JAXFER_WRITE_COLABS"):
        env["JAXFER_COLAB_SMALL"] = "1"  # a small subset in the suite; the committed outputs are full size
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell and its traceback
    if os.environ.get("JAXFER_WRITE_COLABS"):
        nbformat.write(nb, path)

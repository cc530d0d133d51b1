"""Every notebook in colabs/ runs top to bottom (its code cells, in order, in one namespace)."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_colabs():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_colab_runs_top_to_bottom(path, capsys):
    cells = json.load(open(path))["cells"]
    namespace: dict = {"__name__": "__colab__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{os.path.basename(path)}[{i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "frozen embeddings bit-identical: True" in out
    assert "now at step" in out

"""The README's Python tour runs as written (docs that match the code)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tour_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = [b for b in blocks if "jf.load(" in b]
    assert len(tour) == 1
    namespace: dict = {}
    exec(compile(tour[0], "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report["num_examples"] == 8
    out = capsys.readouterr().out
    assert "trainable" in out.lower()
    # frozen really frozen: the embeddings did not move
    import numpy as np
    before = namespace["model"].params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    after = namespace["state"].params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert np.array_equal(np.asarray(before), np.asarray(after))

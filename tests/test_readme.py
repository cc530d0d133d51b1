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


def test_readme_peft_block_continues_the_tour(tmp_path, monkeypatch):
    """The PEFT block runs after the tour: the merged LoRA model equals the wrapped one, the adapter
    file is small and reloads, BitFit/L2-SP/BSS build."""
    import numpy as np

    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = [b for b in blocks if "jf.load(" in b]
    peft = [b for b in blocks if "lora.add(" in b]
    assert len(tour) == 1 and len(peft) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour[0], "README.md", "exec"), namespace)
    exec(compile(peft[0], "README.md", "exec"), namespace)
    ns = namespace
    batch = next(iter(ns["evals"]))
    wrapped = ns["lora_apply"]({"params": ns["lora_state"].params}, batch, train=False)[0]["logits"]
    plain = ns["apply_fn"]({"params": ns["merged"]}, batch, train=False)[0]["logits"]
    np.testing.assert_allclose(np.asarray(plain), np.asarray(wrapped), atol=1e-5)
    assert os.path.getsize(tmp_path / "tweets_lora.safetensors") < 0.05 * 4 * 22_714_371
    assert "lora" in ns["restored"] and "lora" not in ns["merged"]


def test_readme_transfer_block_continues_the_tour():
    """Scores, a multitask model and loss, the adaptation head, term and mixed batches, as written."""
    import numpy as np

    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = [b for b in blocks if "jf.load(" in b]
    block = [b for b in blocks if "select." in b]
    assert len(tour) == 1 and len(block) == 1
    namespace: dict = {}
    exec(compile(tour[0], "README.md", "exec"), namespace)
    exec(compile(block[0], "README.md", "exec"), namespace)
    batch = namespace["batch"]
    np.testing.assert_array_equal(batch["domain"], [0] * 4 + [1] * 4)
    assert (batch["label"][4:] == -100).all() and (batch["label"][:4] >= 0).all()
    assert sorted(namespace["mt_model"].params["classifier"]) == ["score", "sentiment"]


def test_reliability_table_names_tests_that_exist():
    """Each ``test_x.py::name`` (or ``::name`` after one) the Reliability table cites is a test."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    cited, current = [], None
    for ref in re.findall(r"`((?:test_\w+\.py)?::\w+|test_\w+\.py)`", section):
        module, _, name = ref.partition("::")
        current = module or current
        if name:
            cited.append((current, name))
    assert len(cited) >= 30
    for module, name in cited:
        source = open(os.path.join(ROOT, "tests", module)).read()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"README cites {module}::{name}, not a test"

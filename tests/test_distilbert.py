"""DistilBERT against transformers (torch, eval mode) on a tiny random checkpoint."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import masks, tree  # noqa: E402
from jaxfer.models import heads  # noqa: E402
from tests.parity import TOL, maxdiff, torch_out  # noqa: E402

TINY = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)


def test_backbone_parity_and_layer_rules(tmp_path):
    torch.manual_seed(0)
    ref_model = transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(**TINY, num_labels=3)).eval()
    ref_model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = mask[2, 2:] = 0
    model = jw.load(tmp_path)  # the backbone of a task checkpoint: HF's head is dropped
    assert {"pre_classifier/kernel", "classifier/kernel"} <= set(model.report.dropped)
    out = model.apply(None, ids, attention_mask=mask, output_hidden_states=True)
    ref = torch_out(ref_model.distilbert, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    d = max(maxdiff(a, b, mask) for a, b in zip(out["hidden_states"], ref.hidden_states, strict=True))
    print(f"DistilBERT parity: hidden states {d:.2e}")
    assert d <= TOL and maxdiff(out["last_hidden_state"], ref.last_hidden_state, mask) <= TOL

    clf = jw.load(tmp_path, head=heads.Classifier(3), reinit=["classifier/**"])
    assert clf.module.head.pooling == "cls"
    selected = tree.flatten(masks.resolve(masks.layers(1), clf.params))  # the default pattern knows it
    layer1 = {p for p in selected if p.startswith("distilbert/transformer/layer/1/")}
    assert {p for p, v in selected.items() if v} == layer1

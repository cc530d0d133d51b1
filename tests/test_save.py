"""Save back to the Hugging Face layout: fine-tune a few steps, `jf.save`, load the folder with
transformers in PyTorch (logits within 1e-4 of jaxfer's) and with `jf.load(dir, head="checkpoint")`
(the same variables, bit for bit)."""

import json
import os

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer as jf  # noqa: E402
from jaxfer import tree  # noqa: E402
from jaxfer.transfer import lora  # noqa: E402
from jaxfer.weights.save import SaveError  # noqa: E402

from stand_ins import tiny_bert, tiny_resnet, tiny_vit  # noqa: E402

TOL = 1e-4
LABELS = ("negative", "neutral", "positive")


def text_batch(n=6, seq=12, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int32)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    ids = np.where(mask == 1, rng.integers(5, vocab, (n, seq)), 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "label": rng.integers(0, 3, n).astype(np.int32), "mask": np.ones(n, np.float32)}


def image_batch(n=6, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.normal(size=(n, 3, size, size)).astype(np.float32),
            "label": rng.integers(0, 3, n).astype(np.int32), "mask": np.ones(n, np.float32)}


def fine_tune(model, batch, steps=3, apply_fn=None, params=None):
    """A few Adam steps on everything: every leaf (batch-norm statistics too) moves."""
    params = model.params if params is None else params
    rules = [("**", 1.0)]
    tx = jf.optim.build(optax.adam(1e-2), rules)
    step = jf.make_train_step(apply_fn or jf.model_apply(model), jf.losses.softmax_cross_entropy(), tx,
                              jf.masks.trainable_mask(params, rules))
    state = jf.TrainState.create(params, tx, rng=0, model_state=model.state)
    for _ in range(steps):
        state, _ = step(state, batch)
    return jax.device_get({"params": state.params, **state.model_state})


def hf_logits(path, batch):
    ref = transformers.AutoModelForSequenceClassification if "input_ids" in batch else \
        transformers.AutoModelForImageClassification
    model, info = ref.from_pretrained(path, output_loading_info=True)
    model.eval()
    inputs = {k: torch.tensor(np.asarray(v)) for k, v in batch.items() if k not in ("label", "mask")}
    with torch.no_grad():
        return model(**inputs).logits.numpy(), info, model


def check_round_trip(model, variables, batch, path, unexpected=()):
    jf.save(model, path, variables, label_names=LABELS)
    ours = np.asarray(model.apply(variables, **{k: v for k, v in batch.items() if k not in ("label", "mask")})["logits"])
    theirs, info, ref = hf_logits(path, batch)
    diff = float(np.abs(ours - theirs).max())
    print(f"{model.family.model_type}: max |jaxfer - transformers| logits = {diff:.2e}")
    assert info["missing_keys"] == set() or not info["missing_keys"], info["missing_keys"]
    assert sorted(info["unexpected_keys"]) == sorted(unexpected)
    assert diff <= TOL
    assert ref.config.id2label == dict(enumerate(LABELS))
    back = jf.load(path, head="checkpoint")
    assert back.label_names == LABELS
    want, got = tree.flatten(variables), tree.flatten(back.variables)
    assert want.keys() == got.keys()
    for k in want:  # bit for bit
        assert np.asarray(want[k]).dtype == np.asarray(got[k]).dtype, k
        assert np.array_equal(np.asarray(want[k]), np.asarray(got[k])), k
    return diff


def test_bert_fine_tuned_saved_loads_in_transformers_and_back(tmp_path):
    model = jf.load(tiny_bert(str(tmp_path / "bert"), num_layers=2), head=jf.heads.Classifier(3, pooling="pooler"))
    batch = text_batch()
    variables = fine_tune(model, batch)
    assert not np.array_equal(variables["params"]["bert"]["pooler"]["dense"]["kernel"],
                              np.asarray(model.params["bert"]["pooler"]["dense"]["kernel"]))
    check_round_trip(model, variables, batch, tmp_path / "saved")
    config = json.load(open(tmp_path / "saved" / "config.json"))
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert os.path.exists(tmp_path / "saved" / "tokenizer.json")  # the tokenizer came along
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tok("hello")["input_ids"][0] == 101


def test_vit_fine_tuned_saved_loads_in_transformers_and_back(tmp_path):
    model = jf.load(tiny_vit(str(tmp_path / "vit")), head=jf.heads.Classifier(3, pooling="cls"))
    batch = image_batch()
    variables = fine_tune(model, batch)
    # the stand-in is a ViTModel with a pooler, which ViTForImageClassification leaves out
    check_round_trip(model, variables, batch, tmp_path / "saved",
                     unexpected=("vit.pooler.dense.bias", "vit.pooler.dense.weight"))


def test_resnet_fine_tuned_with_batch_stats_saved_loads_in_transformers_and_back(tmp_path):
    model = jf.load(tiny_resnet(str(tmp_path / "resnet")), head=jf.heads.Classifier(3, dense_name="1"))
    batch = image_batch()
    variables = fine_tune(model, batch)
    moved = [k for k, v in tree.flatten(variables["batch_stats"]).items()
             if not np.array_equal(v, tree.flatten(model.state["batch_stats"])[k])]
    assert moved  # running statistics were updated by training and are saved
    check_round_trip(model, variables, batch, tmp_path / "saved")
    assert json.load(open(tmp_path / "saved" / "config.json"))["architectures"] == ["ResNetForImageClassification"]


def test_roberta_with_hf_head_saved_and_back(tmp_path):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=32,
                                        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
    transformers.RobertaModel(config).save_pretrained(tmp_path / "roberta")
    model = jf.load(tmp_path / "roberta", head=jf.heads.TanhClassifier(3))
    batch = text_batch()
    batch["input_ids"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], 1)
    variables = fine_tune(model, batch)
    # RobertaForSequenceClassification has no pooler; jaxfer keeps the backbone's
    check_round_trip(model, variables, batch, tmp_path / "saved",
                     unexpected=("roberta.pooler.dense.bias", "roberta.pooler.dense.weight"))


def test_lora_is_merged_first_and_heads_hf_lacks_are_errors(tmp_path):
    source = tiny_bert(str(tmp_path / "bert"), num_layers=2)
    model = jf.load(source, head=jf.heads.Classifier(3, pooling="pooler"))
    params, spec = lora.add(model.params, [("bert/encoder/layer/*/attention/self/query/kernel", lora.LoRA(2))], rng=0)
    batch = text_batch()
    variables = fine_tune(model, batch, apply_fn=lora.wrap(jf.model_apply(model), spec), params=params)
    with pytest.raises(SaveError, match="merge LoRA"):
        jf.save(model, tmp_path / "x", variables)
    merged = {**variables, "params": lora.merge(variables["params"], spec)}
    check_round_trip(model, merged, batch, tmp_path / "saved")

    mean = jf.load(source, head=jf.heads.Classifier(3, pooling="mean"))
    with pytest.raises(SaveError, match="no Hugging Face class has this Classifier head .*'mean'"):
        jf.save(mean, tmp_path / "y")


def test_backbone_without_head_saves_as_the_base_class(tmp_path):
    model = jf.load(tiny_bert(str(tmp_path / "bert"), num_layers=2))
    jf.save(model, tmp_path / "saved")
    assert json.load(open(tmp_path / "saved" / "config.json"))["architectures"] == ["BertModel"]
    ref = transformers.AutoModel.from_pretrained(tmp_path / "saved").eval()
    batch = text_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        theirs = ref(**{k: torch.tensor(v) for k, v in inputs.items()}).pooler_output.numpy()
    assert np.abs(np.asarray(model.apply(None, **inputs)["pooler_output"]) - theirs).max() <= TOL
    with pytest.raises(ValueError, match="none with a head jaxfer builds"):
        jf.load(tmp_path / "saved", head="checkpoint")

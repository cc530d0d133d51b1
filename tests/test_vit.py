"""ViT parity against transformers (torch, eval mode) on tiny random checkpoints."""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import tree  # noqa: E402
from jaxfer.models import heads, registry, vit  # noqa: E402
from jaxfer.models.keymap import apply_key_map, generic_rules, strip_prefix  # noqa: E402
from tests.parity import TOL, assert_same_layout, maxdiff, numpy_state_dict, variables  # noqa: E402
from tests.parity import torch_out as _torch_out  # noqa: E402

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, num_labels=3)


def pixels(n=2, size=32):
    return np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32)


def torch_out(model, x):
    return _torch_out(model, x, output_hidden_states=True)


@pytest.fixture(scope="module")
def torch_base():
    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(**TINY)).eval()


def test_backbone_parity(torch_base):
    cfg = torch_base.config
    flat, unused = vit.convert(numpy_state_dict(torch_base), cfg)
    assert unused == []
    module = vit.build(cfg)
    assert_same_layout(module, vit.dummy_inputs(cfg), flat)
    assert flat["params"]["embeddings/position_embeddings"].shape == (1, 1 + 16, 32)

    x = pixels()
    out = module.apply(variables(flat), x, output_hidden_states=True)
    ref = torch_out(torch_base, x)
    d_last = maxdiff(out["last_hidden_state"], ref.last_hidden_state)
    d_pool = maxdiff(out["pooler_output"], ref.pooler_output)
    print(f"ViT parity: last_hidden_state {d_last:.2e}, pooler_output {d_pool:.2e}")
    assert d_last <= TOL and d_pool <= TOL
    assert len(out["hidden_states"]) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert maxdiff(ours, theirs) <= TOL


def test_saved_and_in_memory_key_spellings_convert_alike(torch_base, tmp_path):
    """transformers 5 renames ViT modules in memory (``layers.0.mlp.fc1``) but saves the
    checkpoint spelling (``encoder.layer.0.intermediate.dense``); both must convert the same."""
    torch_base.save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("encoder.layer.0.attention.attention.query") for k in saved)
    a, unused_a = vit.convert(saved, torch_base.config)
    b, unused_b = vit.convert(numpy_state_dict(torch_base), torch_base.config)
    assert unused_a == unused_b == []
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        np.testing.assert_array_equal(a["params"][k], b["params"][k], err_msg=k)


def test_unknown_keys_are_reported(torch_base):
    sd = numpy_state_dict(torch_base)
    sd["embeddings.mask_token"] = np.zeros((1, 1, 32), np.float32)
    _, unused = vit.convert(sd, torch_base.config)
    assert unused == ["embeddings.mask_token"]


def test_classification_logits_parity():
    torch.manual_seed(1)
    ref_model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)).eval()
    inner, rest = strip_prefix(numpy_state_dict(ref_model), "vit")
    backbone, unused = vit.convert(inner, ref_model.config)
    head, head_unused = apply_key_map(generic_rules(), rest)
    assert unused == head_unused == []
    backbone_module = vit.ViTModel(ref_model.config, add_pooling_layer=False)  # HF task models keep none
    model = heads.TaskModel(backbone_module, heads.Classifier(3, pooling="cls"), prefix="vit")
    params = {"vit": tree.unflatten(backbone["params"]), **tree.unflatten(head["params"])}
    x = pixels()
    d = maxdiff(model.apply({"params": params}, x)["logits"], torch_out(ref_model, x).logits)
    print(f"ViT classification logits parity: {d:.2e}")
    assert d <= TOL


def test_load_end_to_end(tmp_path):
    torch.manual_seed(2)
    ref_model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)).eval()
    ref_model.save_pretrained(tmp_path)
    x = pixels()
    ref = torch_out(ref_model, x)

    assert not vit.has_pooler(jw.sources.read_config(tmp_path))  # architectures: ViTForImageClassification
    model = jw.load(tmp_path, head=heads.Classifier(3))  # pooling from the family: "cls"
    assert set(model.params) == {"vit", "classifier"}
    assert {"classifier/kernel", "classifier/bias"} <= set(model.report.loaded)
    assert not model.report.reinitialized and not model.report.initialized
    out = model.apply(None, x)
    d_logits = maxdiff(out["logits"], ref.logits)
    print(f"ViT load() logits parity: {d_logits:.2e}")
    assert d_logits <= TOL

    backbone = jw.load(tmp_path)  # the backbone of a task checkpoint: head keys dropped
    assert {"classifier/kernel", "classifier/bias"} <= set(backbone.report.dropped)
    assert "pooler_output" not in backbone.apply(None, x)
    d_last = maxdiff(backbone.apply(None, x)["last_hidden_state"], torch_out(ref_model.vit, x).last_hidden_state)
    assert d_last <= TOL


def test_dropout_only_in_train(torch_base):
    cfg = transformers.ViTConfig(**TINY, hidden_dropout_prob=0.5)
    flat, _ = vit.convert(numpy_state_dict(torch_base), cfg)
    module, v, x = vit.build(cfg), variables(flat), pixels()
    a = module.apply(v, x)["last_hidden_state"]
    b = module.apply(v, x)["last_hidden_state"]
    c = module.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})["last_hidden_state"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3


def test_image_size_must_match_position_table(torch_base):
    flat, _ = vit.convert(numpy_state_dict(torch_base), torch_base.config)
    with pytest.raises(Exception, match="position_embeddings"):
        vit.build(torch_base.config).apply(variables(flat), pixels(size=48))


def test_family_registration_and_dict_config(torch_base):
    fam = registry.get("vit")
    assert fam.base_model_prefix == "vit" and fam.default_pooling == "cls"
    assert fam.num_layers({"num_hidden_layers": 5}) == 5
    flat, _ = fam.convert(numpy_state_dict(torch_base), torch_base.config)
    layers = {int(m.group(1)) for p in flat["params"] if (m := re.search(fam.layer_pattern, p))}
    assert layers == {0, 1}
    assert fam.dummy_inputs(dict(TINY))["pixel_values"].shape == (1, 3, 32, 32)
    # a plain dict config (HF defaults for what it leaves out) builds the same model
    x = pixels()
    want = fam.build(torch_base.config).apply(variables(flat), x)["pooler_output"]
    got = fam.build({**TINY, "model_type": "vit"}).apply(variables(flat), x)["pooler_output"]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_resized_position_table_takes_larger_images(torch_base):
    """After the surgery op resizes the table, the model runs at the new size (shape from the input)."""
    from jaxfer.weights import surgery

    flat, _ = vit.convert(numpy_state_dict(torch_base), torch_base.config)
    params, op = surgery.resize_position_embeddings(tree.unflatten(flat["params"]),
                                                    "embeddings/position_embeddings", 6)
    assert tuple(op.after) == (1, 1 + 36, 32)
    out = vit.build(torch_base.config).apply({"params": params}, pixels(size=48))
    assert out["last_hidden_state"].shape == (2, 37, 32)
    assert np.isfinite(np.asarray(out["pooler_output"])).all()

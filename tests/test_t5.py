"""T5 against transformers (torch, eval mode) on tiny random checkpoints: encoder and decoder
hidden states, LM logits (tied and untied heads), the encoder as a feature extractor,
greedy and beam generation token for token, and the two layer stacks in masks / prefix."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import generation, masks, tree  # noqa: E402
from jaxfer.models import heads, registry, t5  # noqa: E402
from jaxfer.transfer import prefix  # noqa: E402
from tests.parity import TOL, maxdiff, torch_out  # noqa: E402

TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 99, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, :2] = 0  # T5 has no absolute positions: padding may sit on either side
    dec = rng.integers(2, 99, (3, 6))
    dec[:, 0] = 0
    return ids * mask, mask, dec


@pytest.fixture(scope="module")
def relu_tied(tmp_path_factory):
    """Original T5: relu, LM head tied to ``shared`` with the d_model ** -0.5 scaling; a large
    init so that greedy decoding does not just repeat one token."""
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, initializer_factor=5.0)).eval()
    path = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(path)
    return jw.load(path), ref, path


def rel(ours, ref, mask=None) -> float:
    """Max abs diff over max(1, max |ref|): the large-init model's activations reach the
    hundreds, where float32 keeps ~1e-5 relative precision."""
    return maxdiff(ours, ref, mask) / max(1.0, float(np.abs(ref.numpy()).max()))


def compare(model, ref_model):
    ids, mask, dec = inputs()
    out = model.apply(None, ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
    ref = torch_out(ref_model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
    d = {"logits": rel(out["logits"], ref.logits),
         "encoder": max(rel(a, b, mask) for a, b in zip(out["encoder_hidden_states"], ref.encoder_hidden_states,
                                                        strict=True)),
         "decoder": max(rel(a, b) for a, b in zip(out["hidden_states"], ref.decoder_hidden_states, strict=True))}
    return d, out, ref


def test_gated_untied_parity_and_separate_lm_head(tmp_path):
    """T5 v1.1 / Flan-T5: gated-gelu, an untied lm_head, more decoder than encoder layers."""
    torch.manual_seed(1)
    cfg = transformers.T5Config(**TINY, num_decoder_layers=3, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False)
    ref_model = transformers.T5ForConditionalGeneration(cfg).eval()
    ref_model.save_pretrained(tmp_path)
    model = jw.load(tmp_path)  # transformers 5 saved no lm_head.weight: ours takes shared's, as it ties
    d, _, _ = compare(model, ref_model)
    print(f"T5 v1.1 parity (relative to max(1, |ref|)): {d}")
    assert max(d.values()) <= TOL
    assert "decoder/block/2/layer/1/EncDecAttention/k/kernel" in model.report.loaded
    assert "encoder/block/0/layer/1/DenseReluDense/wi_1/kernel" in model.report.loaded

    # an older checkpoint with its own lm_head.weight (tie_word_embeddings false): used as is
    from safetensors.numpy import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = np.random.default_rng(2).normal(size=(99, 32)).astype(np.float32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json.pop("scale_decoder_outputs")
    cfg_json["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    ref_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    model = jw.load(tmp_path)
    np.testing.assert_array_equal(model.params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    d, _, _ = compare(model, ref_model)
    assert d["logits"] <= TOL


def test_tied_parity_and_encoder_as_feature_extractor(relu_tied):
    model, ref_model, path = relu_tied
    d, _, ref = compare(model, ref_model)
    print(f"T5 parity (tied head, relative to max(1, |ref|)): {d}")
    assert max(d.values()) <= TOL
    assert "lm_head" not in model.params
    ids, mask, _ = inputs()
    enc = model.apply(None, ids, attention_mask=mask)  # no decoder inputs: the encoder alone
    assert set(enc) == {"last_hidden_state"}
    assert rel(enc["last_hidden_state"], ref.encoder_last_hidden_state, mask) <= TOL

    # encoder_only builds no decoder and reads only the encoder of a full checkpoint; a classifier
    # head pools it by masked mean (T5 has no CLS token)
    config = transformers.AutoConfig.from_pretrained(path)
    config.encoder_only = True
    clf = jw.load(path, head=heads.Classifier(3), config=config)
    assert {p.split("/")[1] for p in tree.paths(clf.params["transformer"])} == {"embedding", "block",
                                                                                "final_layer_norm"}
    assert clf.module.head.pooling == "mean"
    out = clf.apply(None, ids, attention_mask=mask)
    assert rel(out["last_hidden_state"], ref.encoder_last_hidden_state, mask) <= TOL
    assert out["logits"].shape == (3, 3)


def test_labels_are_shifted_right_like_hf(relu_tied):
    model, ref_model, _ = relu_tied
    ids, mask, dec = inputs()
    labels = dec.copy()
    labels[0, 4:] = -100  # ignored positions are read as pad in the decoder inputs
    out = model.apply(None, ids, attention_mask=mask, labels=labels)
    ref = torch_out(ref_model, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(out["logits"], ref.logits) <= TOL


def test_generation_matches_transformers(relu_tied):
    model, ref_model, _ = relu_tied
    ids, mask, _ = inputs()
    n = 12
    for strategy, beams in (("greedy", 1), ("beam", 3)):
        out = generation.generate(model, ids, mask, max_new_tokens=n, strategy=strategy, num_beams=beams)["tokens"]
        with torch.no_grad():
            want = ref_model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=n,
                                      do_sample=False, num_beams=beams)[:, 1:].numpy()
        for row, ref_row in zip(out, want):
            # up to the EOS (1): after it ours pads with pad (0); HF's beam search fills with EOS
            # (its `pad_token_id or eos` takes pad 0 for false) and stops when every row ended
            end = list(ref_row).index(1) + 1 if 1 in ref_row else len(ref_row)
            np.testing.assert_array_equal(row[:end], ref_row[:end], err_msg=strategy)
            assert (row[end:] == 0).all()
        assert want.shape[1] >= 10 and len(set(out.reshape(-1))) > 4  # not one repeated token

    # new prompts of the same shape: the compiled loop is reused, nothing compiles, not even per token
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = generation.generate(model, (ids + 3) * mask, mask, max_new_tokens=n, strategy="beam",
                                    num_beams=3)["tokens"]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and not np.array_equal(again, out)


def test_relative_position_buckets_match_hf():
    rel = np.arange(-60, 61)[None, :] - np.zeros((1, 1), np.int64)
    for bidirectional in (True, False):
        ours = t5.relative_position_bucket(rel, bidirectional, 32, 128)
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.as_tensor(rel), bidirectional, 32, 128).numpy()
        np.testing.assert_array_equal(ours, ref)


def test_two_stacks_in_layer_rules_and_cached_prefix(relu_tied):
    model, _, _ = relu_tied
    family = registry.get("t5")
    pattern = family.layer_pattern_for(model.config)
    assert family.num_layers(model.config) == 4
    params = model.params
    decoder = {p for p, v in tree.flatten(masks.resolve(masks.layers(2, pattern=pattern), params)).items() if v}
    assert decoder == {p for p in tree.paths(params) if p.startswith("decoder/block/")}
    mult = tree.flatten(masks.lr_multipliers(params, [("**", 1.0)], layer_decay=0.5, num_layers=4,
                                             layer_pattern=pattern))
    assert mult["decoder/block/1/layer/2/DenseReluDense/wo/kernel"] == 0.5
    assert mult["encoder/block/0/layer/0/SelfAttention/q/kernel"] == 0.5 ** 4
    assert mult["shared/embedding"] == 0.5 ** 5

    # the encoder frozen, the decoder trains: its output is cached, exactly
    ids, mask, dec = inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": dec}
    trainable = tree.map_with_path(lambda p, _: p.startswith("decoder/"), params)
    plan = prefix.plan(model.module, model.variables, trainable, batch, layer_pattern=pattern)
    assert plan.exact and plan.module == "encoder/block/1" and plan.layer == 2, plan.describe()
    cached = prefix.boundary_fn(model.module, plan.module)(model.variables, batch)
    out, _ = prefix.cached_apply(model.module, plan.module)(model.variables, {**batch, "boundary": cached},
                                                             train=False)
    want = model.apply(None, ids, attention_mask=mask, labels=dec)["logits"]
    np.testing.assert_allclose(out["logits"], want, atol=1e-5)

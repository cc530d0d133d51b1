"""wav2vec2 against transformers (torch, eval mode) on tiny random checkpoints: both norm
variants, backbone hidden states, the CTC and utterance-classification heads, layer rules."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import masks, tree  # noqa: E402
from jaxfer.models import heads, wav2vec2  # noqa: E402
from tests.parity import TOL, maxdiff, torch_out  # noqa: E402

TINY = dict(vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(16, 16, 24), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, classifier_proj_size=20, pad_token_id=0)
VARIANTS = {  # wav2vec2-base (group norm, post-norm) and -large-lv60 (layer norm everywhere, pre-norm)
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


def _inputs():
    rng = np.random.default_rng(0)
    wave = rng.normal(size=(3, 1600)).astype(np.float32)
    mask = np.ones(wave.shape, np.int32)
    mask[1, 1200:] = mask[2, 700:] = 0
    wave[mask == 0] = 0.0
    return wave, mask


def _frame_mask(ref, mask, frames):
    return ref._get_feature_vector_attention_mask(frames, torch.as_tensor(mask)).numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_ctc_and_classification(tmp_path, variant):
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(**TINY, **VARIANTS[variant], mask_time_prob=0.05, num_labels=3)
    ctc = transformers.Wav2Vec2ForCTC(config).eval()
    ctc.save_pretrained(tmp_path / "ctc")
    wave, mask = _inputs()

    model = jw.load(tmp_path / "ctc", head="checkpoint")
    assert isinstance(model.module.head, heads.CTCHead) and not model.report.initialized
    out = model.apply(None, wave, attention_mask=mask, output_hidden_states=True)
    ref = torch_out(ctc, input_values=wave, attention_mask=mask, output_hidden_states=True)
    fm = _frame_mask(ctc.wav2vec2, mask, out["logits"].shape[1])
    np.testing.assert_array_equal(np.asarray(out["frame_mask"]), fm)
    hidden = [maxdiff(a, b, fm) for a, b in zip(out["hidden_states"], ref.hidden_states, strict=True)]
    logits = maxdiff(out["logits"], ref.logits, fm)
    base = torch_out(ctc.wav2vec2, input_values=wave, attention_mask=mask)
    features = maxdiff(out["extract_features"], base.extract_features)
    print(f"wav2vec2 {variant}: hidden states {max(hidden):.2e}, CTC logits {logits:.2e}, features {features:.2e}")
    assert max(hidden) <= TOL and logits <= TOL and features <= TOL
    assert maxdiff(out["last_hidden_state"], base.last_hidden_state, fm) <= TOL

    clf_ref = transformers.Wav2Vec2ForSequenceClassification(config).eval()
    clf_ref.save_pretrained(tmp_path / "clf")
    clf = jw.load(tmp_path / "clf", head="checkpoint")
    assert isinstance(clf.module.head, heads.UtteranceClassifier) and not clf.report.initialized
    d = maxdiff(clf.apply(None, wave, attention_mask=mask)["logits"],
                torch_out(clf_ref, input_values=wave, attention_mask=mask).logits)
    print(f"wav2vec2 {variant}: utterance classification logits {d:.2e}")
    assert d <= TOL


def test_layer_rules_and_feature_encoder_rule(tmp_path):
    config = dict(model_type="wav2vec2", **TINY, **VARIANTS["base"])
    model = jw.init_model(config, heads.CTCHead(12))
    pattern = model.family.layer_pattern_for(config)
    assert model.family.num_layers(config) == 5  # 3 convs, then 2 transformer layers
    selected = tree.flatten(masks.resolve(masks.layers(3, pattern=pattern), model.params))
    assert {p.split("/")[3] for p, v in selected.items() if v} == {"0", "1"}
    assert all(p.startswith("wav2vec2/encoder/layers/") for p, v in selected.items() if v)
    convs = tree.flatten(masks.resolve(masks.layers(0, 3, pattern=pattern), model.params))
    assert {p for p, v in convs.items() if v} == {p for p in convs if "/feature_extractor/" in p}
    # the default pattern (no family) knows the transformer layers too
    default = tree.flatten(masks.resolve(masks.layers(1), model.params))
    assert {p for p, v in default.items() if v} == {p for p in default if "/encoder/layers/1/" in p}


def test_frame_lengths_weight_norm_keys_and_spec_augment_mask():
    config = dict(**TINY, **VARIANTS["base"])
    lengths = np.array([1600, 1200, 700, 400])
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY))
    want = ref._get_feat_extract_output_lengths(torch.as_tensor(lengths)).numpy()
    np.testing.assert_array_equal(wav2vec2.output_lengths(lengths, config), want)
    # torch's new weight_norm (parametrizations) and the old one (weight_g / weight_v) load alike
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    old = {k.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
    assert any("weight_g" in k for k in old) and any("original0" in k for k in sd)
    (new_vars, unused_new), (old_vars, unused_old) = wav2vec2.convert(sd, config), wav2vec2.convert(old, config)
    assert unused_new == unused_old == [] and new_vars["params"].keys() == old_vars["params"].keys()
    import jax

    valid = np.arange(50)[None, :] < np.array([[50], [30]])
    m = np.asarray(wav2vec2.span_mask(jax.random.key(0), (2, 50), 0.5, 5, 2, valid))
    assert m.shape == (2, 50) and not m[1, 30:].any() and m[0].sum() >= 5


def test_layer_decay_and_frozen_feature_encoder_cached_exactly():
    import jax

    from jaxfer.transfer import prefix, presets

    config = dict(model_type="wav2vec2", **TINY, **VARIANTS["large"], hidden_dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, mask_time_prob=0.0)
    model = jw.init_model(config, heads.CTCHead(12))
    pattern = model.family.layer_pattern_for(config)
    mult = tree.flatten(masks.lr_multipliers(model.params, [("**", 1.0)], layer_decay=0.5, num_layers=5,
                                             layer_pattern=pattern))
    assert mult["wav2vec2/encoder/layers/1/attention/q_proj/kernel"] == 0.5
    assert mult["wav2vec2/feature_extractor/conv_layers/0/conv/kernel"] == 0.5 ** 5
    # the standard first rule: the feature encoder frozen, so its output is the cached prefix
    trainable = masks.trainable_mask(model.params, presets.feature_encoder_frozen())
    wave, mask = _inputs()
    batch = {"input_values": wave, "attention_mask": mask}
    plan = prefix.plan(model.module, model.variables, trainable, batch, layer_pattern=pattern)
    assert plan.exact and plan.module == "wav2vec2/feature_extractor/conv_layers/2" and plan.layer == 3, \
        plan.describe()
    cached = prefix.boundary_fn(model.module, plan.module)(model.variables, batch)
    out, _ = prefix.cached_apply(model.module, plan.module)(model.variables, {**batch, "boundary": cached},
                                                             train=False)
    want = model.apply(None, wave, attention_mask=mask)["logits"]
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(want), atol=1e-5)
    assert jax.tree.leaves(cached)[0].shape[:2] == (3, want.shape[1])

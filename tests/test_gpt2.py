"""GPT-2 against transformers (torch, eval mode) on tiny random checkpoints: hidden states,
LM logits, the sequence-classification head, and generation token for token."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import generation, masks, tree  # noqa: E402
from jaxfer.models import gpt2, heads, registry  # noqa: E402
from jaxfer import save  # noqa: E402
from tests.parity import TOL, maxdiff, torch_out  # noqa: E402

# a large init makes the tiny model's next-token choices varied (0.02 repeats one token)
TINY = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, initializer_range=0.5)


def prompts():
    """Rows: full, left-padded, right-padded (real tokens are never the pad id 0)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 5:] = 0
    return ids * mask, mask


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    path = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(path)
    return jw.load(path), ref


def test_backbone_and_lm_logits_parity(lm):
    model, ref_model = lm
    ids, mask = prompts()
    mask[0, 4] = 0  # a hole: masked keys get no weight
    out = model.apply(None, ids, attention_mask=mask, output_hidden_states=True)
    ref = torch_out(ref_model, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    d_logits = maxdiff(out["logits"], ref.logits, mask)
    d_hidden = max(maxdiff(a, b, mask) for a, b in zip(out["hidden_states"], ref.hidden_states, strict=True))
    print(f"GPT-2 parity: logits {d_logits:.2e}, hidden states {d_hidden:.2e}")
    assert d_logits <= TOL and d_hidden <= TOL
    assert maxdiff(out["last_hidden_state"], ref.hidden_states[-1], mask) <= TOL
    assert model.report.format == "safetensors" and not model.report.initialized
    assert "h/1/attn/c_attn/kernel" in model.report.loaded  # (in, out): copied untransposed


def test_save_back_to_transformers(lm, tmp_path):
    model, ref_model = lm
    save(model, tmp_path)  # the key map inverted: transformers reads it as its own
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, _ = prompts()
    assert maxdiff(torch_out(back, input_ids=ids).logits.numpy(), torch_out(ref_model, input_ids=ids).logits) == 0


def test_sequence_classification_head_parity(tmp_path):
    torch.manual_seed(1)
    ref = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**TINY, num_labels=3)).eval()
    ref.save_pretrained(tmp_path)
    model = jw.load(tmp_path, head=heads.Classifier(3))  # pooling from the family: the last real token
    assert model.module.head.pooling == "last"
    assert "score/kernel" in model.report.dropped  # HF's head is another head: ours starts fresh
    params = jax.tree_util.tree_map(np.asarray, model.params)
    params["classifier"] = {"kernel": ref.score.weight.detach().numpy().T, "bias": np.zeros(3, np.float32)}
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 99, (4, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = mask[2, 2:] = 0
    ids = ids * mask  # right padding with the pad id, as HF finds the last non-pad token
    d = maxdiff(model.apply(params, ids, attention_mask=mask)["logits"], torch_out(ref, input_ids=ids).logits)
    print(f"GPT-2 sequence classification parity: {d:.2e}")
    assert d <= TOL


def test_generation_matches_transformers_and_compiles_once(lm):
    model, ref_model = lm
    ids, mask = prompts()
    # HF generates from left-padded prompts; ours takes padding on either side
    left_ids, left_mask = ids.copy(), mask.copy()
    left_ids[2], left_mask[2] = np.roll(ids[2], 2), np.roll(mask[2], 2)
    n = 12
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    out = generation.generate(model, ids, mask, max_new_tokens=n)["tokens"]
    with torch.no_grad():
        want = ref_model.generate(torch.as_tensor(left_ids), attention_mask=torch.as_tensor(left_mask),
                                  max_new_tokens=n, do_sample=False, num_beams=1)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(out, want)
    assert len(set(out[0])) > 3  # the test model does not just repeat one token

    # new prompts of the same shape: the loop is reused, nothing compiles, not even per token
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = generation.generate(model, (ids + 5) * mask, mask, max_new_tokens=n)["tokens"]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and not np.array_equal(again, out)

    beams = generation.generate(model, ids, mask, max_new_tokens=n, strategy="beam", num_beams=3)
    with torch.no_grad():
        want = ref_model.generate(torch.as_tensor(left_ids), attention_mask=torch.as_tensor(left_mask),
                                  max_new_tokens=n, do_sample=False, num_beams=3)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(beams["tokens"], want)


def test_sampling(lm):
    model, _ = lm
    ids, mask = prompts()
    greedy = generation.generate(model, ids, mask, max_new_tokens=5)["tokens"]
    top1 = generation.generate(model, ids, mask, max_new_tokens=5, strategy="sample", top_k=1, rng=3)["tokens"]
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 leaves only the argmax
    a, b, c = (generation.generate(model, ids, mask, max_new_tokens=5, strategy="sample", top_p=0.9,
                                   temperature=2.0, rng=r)["tokens"] for r in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="unknown strategy 'nucleus'"):
        generation.generate(model, ids, mask, strategy="nucleus")


def test_layer_rules_understand_h_i(lm):
    model, _ = lm
    params = model.params
    family = registry.get("gpt2")
    for pattern in (None, family.layer_pattern_for(model.config)):  # the default pattern knows h/<i>
        top = masks.resolve(masks.layers(1, pattern=pattern), params)
        assert {p for p, v in tree.flatten(top).items() if v} == {p for p in tree.paths(params) if
                                                                p.startswith("h/1/")}
    mult = tree.flatten(masks.lr_multipliers(params, [("**", 1.0)], layer_decay=0.5, num_layers=2,
                                             layer_pattern=family.layer_pattern))
    assert mult["wte/embedding"] == 0.5 ** 3 and mult["h/0/ln_1/scale"] == 0.5 ** 2
    assert mult["h/1/mlp/c_fc/kernel"] == 0.5 and mult["ln_f/scale"] == 1.0


def test_checkpoint_buffers_are_dropped_and_unsupported_variants_fail():
    sd = {"h.0.attn.bias": np.ones((1, 1, 4, 4)), "h.0.attn.masked_bias": np.array(-1e4),
          "wte.weight": np.zeros((5, 4))}
    flat, unused = gpt2.convert(sd, TINY)
    assert unused == [] and list(flat["params"]) == ["wte/embedding"]
    with pytest.raises(ValueError, match="untied lm_head"):
        gpt2.build({**TINY, "tie_word_embeddings": False})

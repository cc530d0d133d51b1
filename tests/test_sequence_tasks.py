"""Sequence tasks: token losses (causal LM, seq2seq), sequence metrics, text-to-text data,
and an evaluation that returns per-example numbers, never [N, T, vocab] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import data as data_lib
from jaxfer import generation, metrics, tasks
from jaxfer.models.gpt2 import GPT2Model
from jaxfer.train import loop, losses, sequence, step as step_lib
from jaxfer.train.state import TrainState
from tests import stand_ins


def test_token_cross_entropy_equals_one_hot_smoothed_and_ignores_minus_100():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, (2, 5)))
    labels = labels.at[1, 3:].set(-100)
    for s in (0.0, 0.2):
        got, w = losses.token_cross_entropy(logits, labels, s)
        want = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), 7), s))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(w, labels != -100)


def test_causal_lm_loss_is_shifted_and_masked():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6)), jnp.float32)
    batch = {"input_ids": np.array([[1, 2, 3, 4], [5, 1, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 1],
                                                                                              [1, 1, 0, 0]])}
    loss, w = losses.for_task("causal_lm")({"logits": logits}, batch)
    assert loss.shape == w.shape == (2, 3)
    np.testing.assert_array_equal(w, [[1, 1, 1], [1, 0, 0]])  # padding predicts nothing
    np.testing.assert_allclose(loss[0, 0], -jax.nn.log_softmax(logits[0, 0])[2], rtol=1e-6)  # position 0 -> token 1
    labels = np.array([[-100, -100, 3, 4], [-100, 1, -100, -100]])  # HF style: loss on the answer only
    _, w = losses.causal_lm()({"logits": logits}, {**batch, "labels": labels})
    np.testing.assert_array_equal(w, [[0, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        losses.for_task("lm")
    assert tasks.is_sequence("seq2seq") and not tasks.is_sequence("classification")


def test_sequence_metrics_known_values():
    assert metrics.sequence([5, 6, -100, 1, 7], eos_id=1) == (5, 6)
    assert metrics.exact_match([(1, 2), (3,)], [(1, 2), (4,)]) == 0.5
    assert metrics.bleu([(1, 2, 3, 4)], [(1, 2, 3, 4)]) == pytest.approx(1.0)
    assert metrics.bleu([(9, 9, 9, 9)], [(1, 2, 3, 4)]) == 0.0
    # half the unigrams right, none of the bigrams: smoothed, and a short output pays the brevity penalty
    short = metrics.bleu([(1, 9)], [(1, 2, 3, 4)], max_order=2)
    assert short == pytest.approx(np.exp(1 - 4 / 2) * np.sqrt(0.5 * (1 / 2)))
    assert metrics.perplexity([2.0, 4.0], [2, 2]) == pytest.approx(np.exp(1.5))
    out = {"loss": np.array([1.0, 3.0]), "weight": np.array([2.0, 2.0]), "token_correct": np.array([2.0, 1.0]),
           "generated": np.array([[7, 1, 0], [8, 8, 1]]), "target_ids": np.array([[7, 1, -100], [9, 1, -100]]),
           "label": np.array([0, 1])}
    r = metrics.sequence_report(out, eos_id=1, class_targets=((7,), (9,)), label_names=("neg", "pos"))
    assert r["perplexity"] == pytest.approx(np.exp(1.0)) and r["token_accuracy"] == 0.75
    assert r["exact_match"] == 0.5 and r["accuracy"] == 0.5 and r["other_rate"] == 0.5
    assert r["macro_f1"] == 0.5  # mean of neg F1 1 and pos F1 0: "(other)" is a miss, not a class
    assert r["per_class"]["(other)"]["support"] == 0


def test_text_to_text_layouts():
    tok = data_lib.load_tokenizer(stand_ins.minilm_dir())
    src = data_lib.from_arrays({"text": np.array(["good day", "so bad"], object), "label": np.array([1, 0])})
    eos = tok.sep_token_id
    s2s = data_lib.tokenize_text_to_text(src, tok, ["positive", "negative"], layout="seq2seq", eos_id=eos,
                                         max_length=8, target_length=3).columns
    pos = tok("positive", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(s2s["labels"][0], pos + [eos] + [-100] * (2 - len(pos)))
    assert "text" not in s2s and (s2s["label"] == [1, 0]).all()
    lm = data_lib.tokenize_text_to_text(src, tok, ["positive", "negative"], layout="causal_lm", eos_id=eos,
                                        max_length=8, target_length=3).columns
    assert lm["input_ids"].shape == (2, 11) and lm["prompt_ids"].shape == (2, 8)
    n = int(s2s["attention_mask"][0].sum())  # [CLS] good day [SEP], then the answer
    np.testing.assert_array_equal(lm["input_ids"][0, :n + 2], list(s2s["input_ids"][0, :n]) + pos + [eos])
    np.testing.assert_array_equal(lm["labels"][0, :n + 2], [-100] * n + pos + [eos])
    assert lm["attention_mask"][0].sum() == n + 2


def test_evaluation_returns_per_example_numbers_not_logits():
    config = dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, eos_token_id=1, pad_token_id=0)
    module = GPT2Model(config)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(2, 50, (4, 10)), "attention_mask": np.ones((4, 10), np.int32),
             "prompt_ids": rng.integers(2, 50, (4, 6)), "prompt_mask": np.ones((4, 6), np.int32),
             "target_ids": np.full((4, 3), -100), "label": np.arange(4), "mask": np.array([1, 1, 1, 0])}
    params = module.init(jax.random.key(0), batch["input_ids"])["params"]
    settings = generation.settings_for(config, 3)
    apply_fn = sequence.eval_apply(step_lib.linen_apply(module), module, "causal_lm", settings)
    eval_step = step_lib.make_eval_step(apply_fn, losses.for_task("causal_lm"),
                                        output_keys=sequence.output_keys(settings), label_key=sequence.LABEL_KEYS)
    out = loop.predict(TrainState.create(params, optax.sgd(0.1)), eval_step, [batch])
    assert sorted(out) == ["generated", "label", "loss", "target_ids", "token_correct", "weight"]
    assert out["generated"].shape == (3, 3) and out["loss"].shape == (3,)  # the padding row dropped
    np.testing.assert_array_equal(out["weight"], [9, 9, 9])
    report = metrics.sequence_report(out, eos_id=1)
    assert report["perplexity"] > 1 and 0 <= report["token_accuracy"] <= 1

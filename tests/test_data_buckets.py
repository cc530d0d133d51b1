"""Length buckets: batches cut to a few fixed lengths, only padding cut, grouped orders
resumable; a two-epoch run compiles each step once per bucket shape."""

import numpy as np
import pytest

from jaxfer import data
from jaxfer.data import buckets as buckets_lib


def test_lengths_are_one_past_the_last_real_token():
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert buckets_lib.lengths(mask).tolist() == [3, 1, 0, 5, 5]  # left padding: nothing to cut
    assert buckets_lib.default_sizes(48) == (16, 32, 48)
    assert buckets_lib.default_sizes(128) == (16, 32, 64, 128)
    assert buckets_lib.default_sizes(8) == (8,)


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="ascending"):
        buckets_lib.Buckets(np.array([1, 2]), (32, 16), ("input_ids",))
    with pytest.raises(ValueError, match="exceeds the largest bucket 16"):
        buckets_lib.Buckets(np.array([1, 20]), (8, 16), ("input_ids",))
    src = data.from_arrays({"text": np.array(["w1 w2"], object)})
    with pytest.raises(ValueError, match="length_buckets must be 'auto'"):
        data.make_pipeline(src, global_batch_size=1, train=False, tokenizer=_Tokenizer(), length_buckets="yes")


class _Tokenizer:
    """Words -> ids 1..n, right-padded with 0 (what the pipeline needs of a HF tokenizer)."""

    calls = 0

    def get_vocab(self):
        return {f"w{j}": 2 + j for j in range(64)}

    def __call__(self, texts, max_length, **_):
        self.calls += 1
        ids = np.zeros((len(texts), max_length), np.int64)
        for i, t in enumerate(texts):
            words = t.split()[:max_length]
            ids[i, :len(words)] = [2 + int(w[1:]) for w in words]
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}


def _source(n=200, seed=0):
    r = np.random.default_rng(seed)
    sizes = np.minimum(r.geometric(0.25, n), 30)  # mostly short, a few long, like tweets
    texts = [" ".join(f"w{j}" for j in range(int(k))) for k in sizes]
    return data.from_arrays({"text": np.array(texts, object), "label": r.integers(0, 3, n)}), texts


@pytest.mark.parametrize("train", [True, False])
def test_batches_are_cut_to_buckets_and_only_padding_is_cut(train):
    src, texts = _source()
    kw = dict(global_batch_size=8, train=train, tokenizer=_Tokenizer(), max_length=32, num_epochs=1, seed=3)
    full = list(data.make_pipeline(src, length_buckets=None, **kw))
    cut = list(data.make_pipeline(src, length_buckets=(8, 16), **kw))
    assert len(cut) == len(full) > 1
    sizes = {b["input_ids"].shape[1] for b in cut}
    assert sizes <= {8, 16, 32} and len(sizes) > 1
    for a, b in zip(full, cut):
        size = b["input_ids"].shape[1]
        assert a["attention_mask"][:, size:].sum() == 0  # what was cut was padding only
        assert a["attention_mask"].sum(1).max() > (size // 2 if size > 8 else 0)  # and the smallest bucket that fits
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            np.testing.assert_array_equal(a[k][:, :size], b[k])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_grouped_batches_hold_similar_lengths_and_resume_exactly():
    src, texts = _source(400)
    kw = dict(global_batch_size=8, train=True, tokenizer=_Tokenizer(), max_length=32, seed=1)
    plain = data.make_pipeline(src, **kw)
    grouped = data.make_pipeline(src, group_by_length=True, **kw)
    steps = plain.steps_per_epoch
    spread = lambda it: np.mean([np.ptp(b["attention_mask"].sum(1)) for b in (next(it) for _ in range(steps))])
    assert spread(grouped) < 0.5 * spread(plain)
    # every example once per epoch (the incomplete tail aside), a different grouping each epoch
    e0, e1 = grouped.order(0), grouped.order(1)
    assert sorted(e0.tolist()) == list(range(400)) and not np.array_equal(e0, e1)
    # resumable: from a state mid-epoch 2, the same batches as an uninterrupted run
    a = data.make_pipeline(src, group_by_length=True, **kw)
    for _ in range(2 * steps + 5):
        next(a)
    b = data.make_pipeline(src, group_by_length=True, **kw)
    b.set_state(a.get_state())
    for _ in range(10):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_cut_batches_give_the_same_loss_and_gradients():
    """Only padding columns are cut, so a step on the cut batch equals the step on the full one."""
    jax = pytest.importorskip("jax")
    import optax

    from jaxfer.train import TrainState, linen_apply, losses, make_train_step
    from tests.stand_ins import tiny_bert_task

    model, params, batch = tiny_bert_task()
    mask = np.zeros((4, 16), np.int32)
    for i, n in enumerate((3, 9, 5, 2)):
        mask[i, :n] = 1
    ids = np.where(mask, np.arange(1, 17)[None] * (np.arange(4)[:, None] + 2), 0).astype(np.int32)
    full = {"input_ids": ids, "attention_mask": mask, "label": batch["label"]}
    cut = {k: (v[:, :9] if v.ndim == 2 else v) for k, v in full.items()}
    tx = optax.sgd(0.1)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, donate=False)
    state = TrainState.create(params, tx, rng=0)
    (s_full, m_full), (s_cut, m_cut) = step(state, full), step(state, cut)
    assert abs(float(m_full["loss"]) - float(m_cut["loss"])) < 1e-6
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                  s_full.params, s_cut.params)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-6


def test_two_epochs_with_evaluation_compile_each_step_once_per_bucket_shape():
    """The train and eval steps compile once per batch shape they meet: never again
    across epochs, after evaluations, or between the first and later steps."""
    jax = pytest.importorskip("jax")
    import optax

    import jaxfer as jf
    from tests.stand_ins import tiny_bert_task

    model, params, _ = tiny_bert_task(vocab_size=64)
    src, _ = _source(64, seed=2)
    kw = dict(tokenizer=_Tokenizer(), max_length=16, length_buckets=(4, 8), seed=0)
    train = data.make_pipeline(src, global_batch_size=8, train=True, group_by_length=True, **kw)
    evals = data.make_pipeline(src.select(np.arange(24)), global_batch_size=4, train=False, **kw)
    steps = 2 * train.steps_per_epoch
    probe = data.make_pipeline(src, global_batch_size=8, train=True, group_by_length=True, **kw)
    train_shapes = {next(probe)["input_ids"].shape for _ in range(steps)}
    eval_shapes = {b["input_ids"].shape for b in evals}
    assert len(train_shapes) > 1 and len(eval_shapes) > 1

    tx = optax.adamw(1e-3)
    apply_fn, loss_fn = jf.linen_apply(model), jf.losses.softmax_cross_entropy()
    step, eval_step = jf.make_train_step(apply_fn, loss_fn, tx), jf.make_eval_step(apply_fn, loss_fn)
    state = jf.TrainState.create(params, tx, rng=0)
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, history = jf.fit(state, step, train, steps=steps, eval_step=eval_step, eval_batches=evals,
                                eval_every=train.steps_per_epoch, log_every=4, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [r["step"] for r in history if r["split"] == "eval"] == [steps // 2, steps]
    assert step._cache_size() == len(train_shapes)
    assert eval_step._cache_size() == len(eval_shapes)
    assert len(compiles) == len(train_shapes) + len(eval_shapes)


def test_a_mixture_pads_parts_cut_to_different_buckets():
    from jaxfer.data import mixture

    short, _ = _source(64, seed=4)
    long_ = data.from_arrays({"text": np.array([" ".join(f"w{j}" for j in range(20))] * 16, object),
                              "label": np.zeros(16, np.int64)})
    kw = dict(train=True, tokenizer=_Tokenizer(), max_length=32, length_buckets=(8, 16), seed=0)
    mix = mixture.Mixture({"short": data.make_pipeline(short, global_batch_size=4, **kw),
                           "long": data.make_pipeline(long_, global_batch_size=2, **kw)})
    batch = next(mix)
    assert batch["input_ids"].shape == (6, 32) and batch["attention_mask"][:4, 16:].sum() == 0
    assert batch["attention_mask"][4:].sum(1).tolist() == [20, 20]


def test_tokens_are_cached_on_disk_and_keyed_by_what_they_depend_on(tmp_path):
    from jaxfer.data import text as text_lib

    src, _ = _source(40)
    tok = _Tokenizer()
    first = text_lib.tokenize(src, tok, 16, cache_dir=tmp_path)
    again = text_lib.tokenize(src, tok, 16, cache_dir=tmp_path)
    assert tok.calls == 1 and len(list(tmp_path.iterdir())) == 1  # the second came from the file
    for k in ("input_ids", "attention_mask", "label"):
        np.testing.assert_array_equal(first.columns[k], again.columns[k])
    text_lib.tokenize(src, tok, 8, cache_dir=tmp_path)  # another max_length
    text_lib.tokenize(src.select(np.arange(39)), tok, 16, cache_dir=tmp_path)  # other texts
    assert tok.calls == 3 and len(list(tmp_path.iterdir())) == 3

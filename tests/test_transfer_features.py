"""Cached features: the probe on cached features is the probe through the frozen backbone;
the disk cache is reused and resumes; linear probes match scikit-learn."""

import os

import jax
import numpy as np
import optax
import pytest

from jaxfer import data, masks, tree
from jaxfer.models.bert import BertModel
from jaxfer.models.heads import Classifier, TaskModel
from jaxfer.train import TrainState, linen_apply, losses, make_eval_step, make_train_step
from jaxfer.transfer import batches, features, probe

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.3,
              attention_probs_dropout_prob=0.3, hidden_act="gelu")


def tiny_task_model(pooling="mean", dropout=0.5, seed=0):
    model = TaskModel(BertModel(CONFIG), Classifier(3, pooling=pooling, dropout_rate=dropout))
    r = np.random.default_rng(seed)
    ids = np.zeros((1, 8), np.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), input_ids=ids))["params"]
    params = jax.tree_util.tree_map(lambda x: (0.2 * r.normal(size=x.shape)).astype(x.dtype), shapes)
    return model, params


def token_source(n=40, seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(1, 50, size=(n, 8)).astype(np.int32)
    lengths = r.integers(3, 9, size=n)
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    return data.ArraySource({"input_ids": ids * mask, "attention_mask": mask,
                             "token_type_ids": np.zeros_like(ids), "label": r.integers(0, 3, n).astype(np.int32),
                             "id": np.arange(100, 100 + n)})


def test_cached_probe_equals_probe_through_the_backbone(tmp_path):
    model, params = tiny_task_model()
    rules = (("classifier/**", 1.0), ("**", None))
    trainable = masks.trainable_mask(params, rules)
    src = token_source()
    train = data.pipeline(src, global_batch_size=8, train=True, seed=1)
    evals = data.pipeline(src, global_batch_size=16, train=False)  # 3 batches, the last padded

    feats = features.cached(features.head_input_fn(model), {"params": params}, evals,
                            directory=str(tmp_path), key="k", chunk_batches=2)
    assert feats.shape == (40, 16) and sorted(os.listdir(tmp_path / "k"))[0] == "ids_00000.npy"
    np.testing.assert_array_equal(np.sort(feats.ids), src.columns["id"])

    loss_fn = losses.softmax_cross_entropy()
    tx = optax.adamw(1e-1, weight_decay=0.01)
    tx = optax.partition({"t": tx, "f": optax.set_to_zero()},
                         jax.tree_util.tree_map(lambda t: "t" if t else "f", trainable))
    through = make_train_step(linen_apply(model), loss_fn, tx, trainable)
    on_cache = make_train_step(features.head_apply(model.head), loss_fn, tx, trainable)
    s1, s2 = TrainState.create(params, tx, rng=7), TrainState.create(params, tx, rng=7)
    cached_train = batches.with_features(data.pipeline(src, global_batch_size=8, train=True, seed=1), feats,
                                          drop=("input_ids", "token_type_ids"))
    for _ in range(6):  # more than one epoch; the head's dropout draws the same masks
        s1, m1 = through(s1, next(train))
        s2, m2 = on_cache(s2, next(cached_train))
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    a, b = tree.flatten(jax.device_get(s1.params)), tree.flatten(jax.device_get(s2.params))
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-5, atol=1e-6, err_msg=path)
        if not path.startswith("classifier"):
            assert np.array_equal(a[path], tree.flatten(params)[path]), path  # frozen: bit-identical

    # evaluation on cached features = evaluation through the model
    e1 = make_eval_step(linen_apply(model), loss_fn)
    e2 = make_eval_step(features.head_apply(model.head), loss_fn)
    for batch in evals:
        out1, out2 = e1(s1, batch), e2(s2, batches.with_features([batch], feats)._add(batch))
        np.testing.assert_allclose(out1["logits"], out2["logits"], rtol=1e-5, atol=1e-6)

    # resumable: the wrapped iterator's state passes through
    state = cached_train.get_state()
    nxt = next(cached_train)
    cached_train.set_state(state)
    np.testing.assert_array_equal(next(cached_train)["features"], nxt["features"])


def test_cache_is_reused_and_resumes(tmp_path):
    model, params = tiny_task_model(pooling="cls")
    evals = data.pipeline(token_source(), global_batch_size=8, train=False)
    fn = features.module_output_fn(model, "bert/encoder/layer/1")
    ref = features.extract(fn, {"params": params}, evals)
    # the output of layer 1 is hidden state 2 of the backbone
    cols = token_source().columns
    hidden = BertModel(CONFIG).apply({"params": params["bert"]}, cols["input_ids"], cols["attention_mask"],
                                     output_hidden_states=True)["hidden_states"][2]
    np.testing.assert_allclose(ref.array(), hidden, rtol=1e-5, atol=1e-5)
    assert ref.shape == (40, 8, 16)

    first = features.cached(fn, {"params": params}, evals, directory=str(tmp_path), key="x",
                            chunk_batches=2)
    assert not first.reused and len(first.chunks) == 3
    np.testing.assert_array_equal(first.array(), ref.array())

    def fail(variables, batch):
        raise AssertionError("a complete cache is not recomputed")

    again = features.cached(fail, {"params": params}, evals, directory=str(tmp_path), key="x", chunk_batches=2)
    assert again.reused and isinstance(again.chunks[0], np.memmap)
    np.testing.assert_array_equal(again.take(np.array([139, 100])), ref.array()[[39, 0]])
    np.testing.assert_array_equal(again.take(np.array([139, 0]), np.array([1, 0]))[1], 0.0)  # padding row
    with pytest.raises(KeyError, match=r"example ids \[7\]"):
        again.take(np.array([7]))

    # an interrupted extraction keeps its finished chunks: only the missing one is computed
    os.remove(tmp_path / "x" / features.INDEX_FILE)
    os.remove(tmp_path / "x" / "rows_00002.npy")
    calls = []

    def counting(variables, batch):
        calls.append(1)
        return fn(variables, batch)

    resumed = features.cached(counting, {"params": params}, evals, directory=str(tmp_path), key="x",
                              chunk_batches=2)
    assert len(calls) == 1  # traced once, for the last chunk's one batch
    np.testing.assert_array_equal(resumed.array(), ref.array())

    assert features.fingerprint({"a": np.ones(3)}, "m") == features.fingerprint({"a": np.ones(3)}, "m")
    assert features.fingerprint({"a": np.ones(3)}) != features.fingerprint({"a": np.ones(3, np.float32)})
    assert features.source_fingerprint(evals) != features.source_fingerprint(
        data.pipeline(token_source(seed=1), global_batch_size=8, train=False))


def _blobs(n=300, d=6, seed=0):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = r.normal(size=(n, d)) * np.array([1, 10, 0.1, 1, 1, 1]) + 1.5 * np.eye(3, d)[y] + 5
    return x.astype(np.float32), y


def test_logistic_regression_and_ridge_match_sklearn():
    from sklearn.linear_model import LogisticRegression, Ridge

    x, y = _blobs()
    xs = (x - x.mean(0)) / x.std(0)
    l2 = 1e-2
    ref = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(xs, y)
    for solver, steps, tol in (("lbfgs", 500, 1e-3), ("adam", 3000, 2e-3)):
        head = probe.logistic_regression(x, y, num_classes=3, l2=l2, solver=solver, steps=steps, lr=0.05)
        p = jax.nn.softmax(probe.logits(head, x))
        np.testing.assert_allclose(p, ref.predict_proba(xs), atol=tol, err_msg=solver)

    head = probe.ridge(x, y, num_classes=3, l2=3.0)
    sk = Ridge(alpha=3.0).fit(x.astype(np.float64), np.eye(3)[y])
    np.testing.assert_allclose(probe.logits(head, x), sk.predict(x), atol=1e-4)
    params = probe.as_head_params(head)
    assert params["kernel"].shape == (6, 3) and params["bias"].shape == (3,)

    with pytest.raises(ValueError, match="labels must be in"):
        probe.logistic_regression(x, y + 1, num_classes=3)


def test_select_l2_and_few_shot():
    x, y = _blobs(600)
    l2, head, scores = probe.select_l2("lbfgs", (x[:400], y[:400]), (x[400:], y[400:]), [1e-4, 1.0, 100.0],
                                       num_classes=3)
    assert [s["l2"] for s in scores] == [1e-4, 1.0, 100.0]
    assert l2 in (1e-4, 1.0) and max(s["accuracy"] for s in scores) > 0.8
    shots = probe.few_shot(x[:400], y[:400], x[400:], y[400:], shots=5, num_classes=3, seeds=(0, 1, 2))
    assert len(shots["accuracy"]["runs"]) == 3 and shots["accuracy"]["std"] > 0
    assert 0.4 < shots["macro_f1"]["mean"] <= 1.0
    with pytest.raises(ValueError, match="500-shot needs 500 examples of every class"):
        probe.few_shot(x, y, x, y, shots=500, num_classes=3)

"""Losses against optax / numpy references: smoothing, ignore index, soft labels, task kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer.train import losses

RNG = np.random.default_rng(0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_integer_labels_matches_optax():
    logits = RNG.normal(size=(6, 5)).astype(np.float32)
    labels = RNG.integers(0, 5, size=6)
    l, w = losses.softmax_cross_entropy()({"logits": logits}, {"label": labels})
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(l, ref, rtol=1e-6)
    np.testing.assert_array_equal(w, np.ones(6))
    assert l.shape == w.shape == (6,)


def test_label_smoothing_matches_numpy_and_torch_formula():
    logits = RNG.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    s = 0.1
    l, _ = losses.softmax_cross_entropy(label_smoothing=s)({"logits": logits}, {"label": labels})
    logp = _log_softmax(logits.astype(np.float64))
    # torch.nn.CrossEntropyLoss(label_smoothing=s): (1-s) * nll + s * mean over classes of -logp
    ref = (1 - s) * -logp[np.arange(4), labels] + s * -logp.mean(-1)
    np.testing.assert_allclose(l, ref, rtol=1e-5)
    plain, _ = losses.softmax_cross_entropy()({"logits": logits}, {"label": labels})
    assert not np.allclose(l, plain)


def test_ignore_index_gets_weight_zero_and_finite_loss():
    logits = RNG.normal(size=(2, 4, 3)).astype(np.float32)  # per token
    labels = np.array([[0, 1, -100, 2], [-100, -100, 1, 0]])
    l, w = losses.softmax_cross_entropy(label_smoothing=0.2)({"logits": logits}, {"label": labels})
    assert l.shape == w.shape == (2, 4)
    np.testing.assert_array_equal(w, labels != -100)
    assert np.isfinite(np.asarray(l)).all()
    keep = labels != -100
    ref = optax.softmax_cross_entropy(logits[keep], optax.smooth_labels(jax.nn.one_hot(labels[keep], 3), 0.2))
    np.testing.assert_allclose(np.asarray(l)[keep], ref, rtol=1e-6)


def test_soft_and_one_hot_float_labels():
    logits = RNG.normal(size=(5, 4)).astype(np.float32)
    labels = RNG.integers(0, 4, size=5)
    fn = losses.softmax_cross_entropy()
    hard, _ = fn({"logits": logits}, {"label": labels})
    one_hot, w = fn({"logits": logits}, {"label": np.eye(4, dtype=np.float32)[labels]})
    np.testing.assert_allclose(one_hot, hard, rtol=1e-6)
    np.testing.assert_array_equal(w, np.ones(5))
    soft = RNG.dirichlet(np.ones(4), size=5).astype(np.float32)  # what mixup makes
    l, _ = fn({"logits": logits}, {"label": soft})
    np.testing.assert_allclose(l, -(soft * _log_softmax(logits)).sum(-1), rtol=1e-5)


def test_bad_label_shape_is_an_error():
    with pytest.raises(ValueError, match="labels of shape"):
        losses.softmax_cross_entropy()({"logits": jnp.zeros((3, 4))}, {"label": jnp.zeros((3, 2), jnp.int32)})
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.softmax_cross_entropy(label_smoothing=1.0)


def test_sigmoid_and_mse_match_references():
    logits = RNG.normal(size=(6, 3)).astype(np.float32)
    targets = RNG.integers(0, 2, size=(6, 3))
    l, w = losses.sigmoid_binary_cross_entropy()({"logits": logits}, {"label": targets})
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(-1)
    np.testing.assert_allclose(l, ref, rtol=1e-5)
    assert w.shape == (6,)

    preds = RNG.normal(size=(6, 1)).astype(np.float32)
    y = RNG.normal(size=6).astype(np.float32)  # [B] labels for a 1-output head
    l, w = losses.mean_squared_error()({"logits": preds}, {"label": y})
    np.testing.assert_allclose(l, (preds[:, 0] - y) ** 2, rtol=1e-6)


def test_for_task_and_custom_keys():
    logits = RNG.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])
    fn = losses.for_task("classification", label_smoothing=0.1, logits_key="out", label_key="y")
    l, _ = fn({"out": logits}, {"y": labels})
    ref, _ = losses.softmax_cross_entropy(0.1)({"logits": logits}, {"label": labels})
    np.testing.assert_allclose(l, ref)
    l, _ = losses.for_task("classification")({"logits": logits}, {"label": labels})
    np.testing.assert_allclose(l, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6)
    multi, _ = losses.for_task("multi_label")({"logits": logits}, {"label": np.ones((4, 3))})
    assert multi.shape == (4,)
    with pytest.raises(ValueError, match="unknown task 'ranking'.*classification"):
        losses.for_task("ranking")


def test_missing_float_targets_get_weight_zero_and_finite_loss():
    preds = RNG.normal(size=(4, 1)).astype(np.float32)
    y = np.array([0.5, np.nan, 1.0, np.nan], np.float32)
    l, w = losses.for_task("regression")({"logits": preds}, {"label": y})
    np.testing.assert_array_equal(w, [1, 0, 1, 0])
    assert np.isfinite(np.asarray(l)).all()
    np.testing.assert_allclose(np.asarray(l)[[0, 2]], (preds[[0, 2], 0] - y[[0, 2]]) ** 2, rtol=1e-6)
    targets = np.array([[1, 0], [np.nan, np.nan], [0, 1], [1, 1]], np.float32)
    l, w = losses.for_task("multi_label")({"logits": preds.repeat(2, 1)}, {"label": targets})
    np.testing.assert_array_equal(w, [1, 0, 1, 1])
    assert np.isfinite(np.asarray(l)).all()

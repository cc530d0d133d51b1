"""Several heads on one backbone: layout, the combined loss, mixtures by ratio, per-task metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxfer as jf
from jaxfer import tasks
from jaxfer.data import mixture
from jaxfer.models import heads
from jaxfer.train import loop
from jaxfer.transfer import multitask

RNG = np.random.default_rng(0)
TASKS = (tasks.Task("sentiment", "classification", 3), tasks.Task("score", "regression", 1, weight=0.5))


class _Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return {"last_hidden_state": nn.Dense(8)(x)[:, None, :]}


def _model(uncertainty=False):
    head = heads.MultiHead({"sentiment": heads.Classifier(3), "score": heads.regressor(1)},
                           pooling="cls", uncertainty=uncertainty)
    return heads.TaskModel(_Backbone(), head, prefix="net")


def test_layout_and_outputs():
    model = _model(uncertainty=True)
    variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    assert sorted(jf.tree.paths(variables["params"])) == [
        "classifier/log_var/score", "classifier/log_var/sentiment", "classifier/score/bias", "classifier/score/kernel",
        "classifier/sentiment/bias", "classifier/sentiment/kernel", "net/Dense_0/bias", "net/Dense_0/kernel"]
    out = model.apply(variables, jnp.ones((2, 4)))
    assert out["logits"]["sentiment"].shape == (2, 3) and out["logits"]["score"].shape == (2, 1)
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        heads.Classifier(2, task="ranking")


def test_combined_loss_fixed_and_uncertainty_and_missing_labels():
    logits = {"sentiment": RNG.normal(size=(4, 3)).astype(np.float32),
              "score": RNG.normal(size=(4, 1)).astype(np.float32)}
    batch = {"sentiment": np.array([0, 2, -100, 1]), "score": np.array([0.5, np.nan, 1.0, np.nan], np.float32)}
    ce = optax.softmax_cross_entropy_with_integer_labels(logits["sentiment"], np.maximum(batch["sentiment"], 0))
    se = (logits["score"][:, 0] - np.nan_to_num(batch["score"])) ** 2
    has_s, has_r = np.array([1, 1, 0, 1.0]), np.array([1, 0, 1, 0.0])
    l, w = multitask.loss_fn(TASKS)({"logits": logits}, batch)
    np.testing.assert_allclose(l, ce * has_s + 0.5 * se * has_r, rtol=1e-6)
    np.testing.assert_array_equal(w, [1, 1, 1, 1])
    s = {"sentiment": jnp.float32(0.3), "score": jnp.float32(-0.2)}
    l, _ = multitask.loss_fn(TASKS, "uncertainty")({"logits": logits, "log_var": s}, batch)
    ref = (np.exp(-0.3) * ce + 0.3) * has_s + (np.exp(0.2) * se - 0.2) * has_r
    np.testing.assert_allclose(l, ref, rtol=1e-5)
    l, w = multitask.loss_fn(TASKS)({"logits": logits}, {"sentiment": np.array([-100] * 4),
                                                          "score": np.full(4, np.nan, np.float32)})
    np.testing.assert_array_equal(w, [0, 0, 0, 0])  # a row with no label does not count


def test_mixture_sizes_composition_resume_and_hidden_labels():
    assert mixture.mixture_sizes(32, {"a": 3, "b": 1}) == {"a": 24, "b": 8}
    assert mixture.mixture_sizes(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="no row for"):
        mixture.mixture_sizes(4, {"a": 100, "b": 1})
    a = jf.data.from_arrays({"x": np.arange(10.0, dtype=np.float32)[:, None],
                             "sentiment": np.arange(10) % 3, "id": np.arange(10)})
    b = jf.data.from_arrays({"x": -np.arange(7.0, dtype=np.float32)[:, None],
                             "score": np.linspace(0, 1, 7).astype(np.float32), "id": np.arange(7)})

    def build():
        return mixture.Mixture({"a": jf.data.pipeline(a, global_batch_size=3, train=True, seed=1),
                                "b": jf.data.pipeline(b, global_batch_size=2, train=True, seed=2)},
                               hide={"b": ("id",)})

    it = build()
    first = [next(it) for _ in range(4)]
    batch = first[0]
    np.testing.assert_array_equal(batch["part"], [0, 0, 0, 1, 1])
    assert (batch["sentiment"][3:] == -100).all() and np.isnan(batch["score"][:3]).all()
    assert (batch["id"][3:] == -100).all() and (batch["x"][3:] <= 0).all()
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    resumed = build()
    resumed.set_state(state)
    for x, y in zip(rest, [next(resumed) for _ in range(5)]):
        jax.tree_util.tree_map(np.testing.assert_array_equal, x, y)


def test_fit_two_tasks_from_a_mixture_with_learned_weights():
    model = _model(uncertainty=True)
    n = 48
    x = RNG.normal(size=(n, 4)).astype(np.float32)
    data = {"a": jf.data.from_arrays({"x": x, "sentiment": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0),
                                      "id": np.arange(n)}),
            "b": jf.data.from_arrays({"x": x, "score": x[:, 2:3].sum(1).astype(np.float32), "id": np.arange(n)})}
    train = mixture.Mixture({k: jf.data.pipeline(v, global_batch_size=8, train=True) for k, v in data.items()})
    evals = mixture.EvalChain({k: jf.data.pipeline(v, global_batch_size=16, train=False) for k, v in data.items()})
    params = model.init(jax.random.key(0), x[:2])["params"]
    tx = optax.adam(3e-2)
    apply_fn = jf.linen_apply(model, input_keys=("x",))
    loss = multitask.loss_fn(TASKS, "uncertainty")
    step = jf.make_train_step(apply_fn, loss, tx)
    eval_step = jf.make_eval_step(apply_fn, loss, label_key=multitask.label_keys(TASKS))
    state = jf.TrainState.create(params, tx, rng=0)
    state, history = loop.fit(state, step, train, steps=60, eval_step=eval_step, eval_batches=evals,
                              metrics_fn=multitask.metrics_fn(TASKS), best_metric="sentiment/accuracy",
                              progress=False)
    report = history[-1]
    assert report["split"] == "eval"
    assert report["sentiment/num_examples"] == n and report["score/num_examples"] == n
    assert report["sentiment/accuracy"] > 0.6 and report["score/r2"] > 0.5
    assert float(state.params["classifier"]["log_var"]["score"]) != 0.0  # learned like any parameter
    assert "[sentiment]" in multitask.format_report(report)

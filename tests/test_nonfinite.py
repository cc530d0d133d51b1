"""Non-finite training is caught: the step skips a non-finite update, the loop stops after
``max_nonfinite_skips`` consecutive ones naming the steps, a non-finite evaluation never
becomes "best", and no checkpoint holding a non-finite value is ever written."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer.data.iterators import EvalBatches, TrainIterator
from jaxfer.data.sources import from_arrays
from jaxfer.errors import NonFiniteError
from jaxfer.train import TrainState, linen_apply, losses, make_eval_step, make_train_step
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.loop import _EarlyStopping, fit


class BNNet(nn.Module):
    """Dense -> BatchNorm -> Dense: the batch statistics are model state the guard must keep."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(3)(x)


def make(lr=0.05, **step_kwargs):
    module, tx = BNNet(), optax.adam(lr)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8)))
    state = TrainState.create(variables["params"], tx, rng=0,
                              model_state={"batch_stats": variables["batch_stats"]})
    apply_fn, loss_fn = linen_apply(module), losses.softmax_cross_entropy()
    step = make_train_step(apply_fn, loss_fn, tx, donate=False, **step_kwargs)
    return state, step, make_eval_step(apply_fn, loss_fn)


def data(n=64, bad=(), seed=0):
    """Blobs; rows in ``bad`` get an inf feature (so their batch's loss is not finite)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n).astype(np.int32)
    x = (np.eye(3, 8)[label] * 3 + rng.normal(size=(n, 8))).astype(np.float32)
    x[list(bad), 0] = np.inf
    return {"x": x, "label": label}


def host(x):
    if isinstance(x, TrainState):
        x = x.replace(rng=jax.random.key_data(x.rng))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(x))


def all_finite(t):
    return all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(t)
               if np.issubdtype(np.asarray(v).dtype, np.floating))


def test_step_skips_a_nonfinite_update_keeping_params_opt_and_batch_stats():
    state, step, _ = make()
    good = {**data(8), "mask": np.ones(8, np.float32)}
    bad = {**data(8, bad=[3]), "mask": np.ones(8, np.float32)}
    state, metrics = step(state, good)
    assert float(metrics["nonfinite"]) == 0.0
    before = host(state)
    after, metrics = step(state, bad)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1  # the batch was consumed
    for name in ("params", "opt_state", "model_state"):  # bit-identical, not just finite
        jax.tree.map(np.testing.assert_array_equal, host(getattr(after, name)), getattr(before, name))
    # an unguarded step lets the NaN in (the old behaviour, kept on request)
    _, raw, _ = make(skip_nonfinite=False)
    unguarded, _ = raw(state, bad)
    assert not all_finite(host(unguarded.model_state)) or not all_finite(host(unguarded.params))


def test_guard_catches_an_optimizer_state_that_overflows_while_the_gradient_is_finite():
    """A gradient of 1e20 is finite, its square in Adam's second moment is not (float32)."""
    params = {"w": jnp.ones((2,), jnp.float32)}
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx, rng=0)
    apply_fn = lambda variables, batch, train=False, rng=None: ({"out": variables["params"]["w"]}, {})
    loss_fn = lambda outputs, batch: (1e20 * outputs["out"].sum(keepdims=True), jnp.ones((1,)))
    after, metrics = make_train_step(apply_fn, loss_fn, tx, donate=False)(state, {"x": np.zeros((1, 2))})
    assert float(metrics["nonfinite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, host(after.opt_state), host(state.opt_state))


def test_guard_also_holds_under_micro_batches():
    state, step, _ = make(micro_batches=2)
    bad = {**data(8, bad=[6]), "mask": np.ones(8, np.float32)}
    after, metrics = step(state, bad)
    assert float(metrics["nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, host(after.params), host(state.params))


def fit_run(tmp_path, bad_rows, steps=8, max_skips=2, every=1):
    state, step, eval_step = make()
    train = TrainIterator(from_arrays(data(64, bad=bad_rows)), 8, shuffle=False)
    evals = EvalBatches(from_arrays(data(24, seed=1)), 8)
    return fit(state, step, train, steps=steps, eval_step=eval_step, eval_batches=evals,
               eval_every=every, workdir=tmp_path, checkpoint_every=every, log_every=1,
               best_metric="loss", best_mode="min", max_nonfinite_skips=max_skips, progress=False)


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_fit_stops_after_consecutive_nonfinite_steps_naming_them(tmp_path):
    # batches of 8 in order: steps 3, 4, 5, ... hold an inf row
    with pytest.raises(NonFiniteError, match=r"steps 3 to 5") as err:
        fit_run(tmp_path, bad_rows=range(16, 64), max_skips=2)
    assert "max_nonfinite_skips=2" in str(err.value)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() and max(ckpt.all_steps()) <= 5
    for s in ckpt.all_steps():  # every checkpoint written is finite
        restored, _, metrics = ckpt.restore(make()[0], step=s)
        assert all_finite(host(restored)) and np.isfinite(metrics["loss"])
    records = strict_json(tmp_path / "metrics.jsonl")  # no NaN in the log either
    assert records[-1]["split"] == "stop" and records[-1]["reason"] == "nonfinite"
    assert [r["nonfinite"] for r in records if r["split"] == "train"][:4] == [0, 0, 1, 1]


def test_fit_skips_isolated_nonfinite_steps_and_finishes(tmp_path):
    state, history = fit_run(tmp_path, bad_rows=[20], steps=8)  # only step 3's batch
    assert int(state.step) == 8 and all_finite(host(state.params))
    train = [r for r in history if r["split"] == "train"]
    assert [r["nonfinite"] for r in train] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert all(np.isfinite(r["loss"]) for r in train if r["nonfinite"] == 0)
    assert "loss" not in train[2]  # the skipped step's NaN is not logged as a number
    strict_json(tmp_path / "metrics.jsonl")


def test_a_nonfinite_evaluation_never_becomes_best():
    stopper = _EarlyStopping("loss", "min", patience=0, saved=None)
    stopper.update(1, {"loss": float("nan"), "accuracy": 0.4})
    stopper.update(2, {"loss": 0.9, "accuracy": 0.5})
    stopper.update(3, {"loss": float("nan")})
    assert (stopper.best, stopper.best_step) == (0.9, 2)
    acc = _EarlyStopping("accuracy", "max", patience=0, saved=None)
    acc.update(1, {"loss": float("nan"), "accuracy": 0.9})  # finite accuracy of NaN logits
    acc.update(2, {"loss": 1.0, "accuracy": 0.5})
    assert acc.best_step == 2


def test_checkpointer_refuses_a_nonfinite_state(tmp_path):
    state, _, _ = make()
    params = jax.tree.map(lambda x: x, state.params)
    params["Dense_1"]["bias"] = params["Dense_1"]["bias"].at[1].set(jnp.nan)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(NonFiniteError, match="params/Dense_1/bias"):
            ckpt.save(1, state.replace(params=params))
        assert ckpt.all_steps() == []
        assert ckpt.save(1, state)


def test_eval_with_nonfinite_loss_is_not_saved_as_best(tmp_path):
    state, _, _ = make()
    with Checkpointer(tmp_path, keep=1, keep_best=1, best_metric="accuracy") as ckpt:
        ckpt.save(1, state, metrics={"accuracy": 0.5, "loss": 1.0})
        ckpt.save(2, state, metrics={"accuracy": 0.9, "loss": float("nan")})
        ckpt.save(3, state, metrics={"accuracy": 0.4, "loss": 1.2})
        ckpt.wait()
        assert ckpt.best_step() == 1 and ckpt.all_steps() == [1, 3]


def test_all_finite_sees_one_nan_or_inf_anywhere_in_any_leaf():
    """The guard's reduction sees a lone NaN or inf at any position and size (a max of |x|, cheaper,
    misses some NaNs on XLA:CPU), and large finite values are finite."""
    from jaxfer.train.step import _all_finite

    check = jax.jit(_all_finite)
    big = np.full((384 * 384,), 3e38, np.float32)
    assert bool(check({"a": big, "b": jnp.ones((3,), jnp.bfloat16), "i": jnp.arange(4)}))
    for n in (1, 7, 1000, 384 * 384):
        for pos in sorted({0, n // 2, n - 1}):
            for value in (np.nan, np.inf, -np.inf):
                x = np.ones((n,), np.float32)
                x[pos] = value
                assert not bool(check({"a": jnp.ones((5,)), "b": x})), (n, pos, value)
    assert not bool(check([jnp.asarray([1.0, np.nan], jnp.bfloat16)]))

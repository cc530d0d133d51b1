"""Budgets users think in: train.epochs sizes the run, train.max_seconds stops it at a checkpoint."""

import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from jaxfer import data, experiment
from jaxfer import Checkpointer, TrainState, fit, linen_apply, losses, make_eval_step, make_train_step


def _cfg(steps, epochs):
    c = ml_collections.ConfigDict()
    c.train = ml_collections.ConfigDict({"steps": steps, "epochs": epochs})
    return c


def test_epochs_size_the_run():
    src = data.from_arrays({"x": np.zeros((100, 2), np.float32), "label": np.zeros(100, np.int32)})
    d = experiment.Data(data.pipeline(src, global_batch_size=8, train=True), None, None, None, None, None, {})
    assert experiment.train_steps(_cfg(0, 2.0), d) == 24  # 12 full batches per epoch
    assert experiment.train_steps(_cfg(0, 0.5), d) == 6
    assert experiment.train_steps(_cfg(30, 0.0), d) == 30
    with pytest.raises(ValueError, match=r"train.steps \(30\) or train.epochs \(2\), not both"):
        experiment.train_steps(_cfg(30, 2.0), d)
    with pytest.raises(ValueError, match=r"train.steps must be > 0, got 0"):
        experiment.train_steps(_cfg(0, 0.0), d)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(3)(x)


def test_time_budget_stops_at_a_checkpoint_and_says_so(tmp_path):
    model = Linear()
    r = np.random.default_rng(0)
    src = data.from_arrays({"x": r.normal(size=(64, 4)).astype(np.float32),
                            "label": r.integers(0, 3, 64).astype(np.int32)})
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.float32))["params"]
    tx = optax.sgd(0.1)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx)
    evals = data.pipeline(src, global_batch_size=16, train=False)
    eval_step = make_eval_step(linen_apply(model), losses.softmax_cross_entropy())
    kw = dict(steps=10, eval_step=eval_step, eval_batches=evals, eval_every=5, checkpoint_every=5,
              workdir=tmp_path, progress=False)
    ckpt = Checkpointer(tmp_path, keep=3)
    state, history = fit(TrainState.create(params, tx), step, data.pipeline(src, global_batch_size=8, train=True),
                         checkpointer=ckpt, max_seconds=1e-9, **kw)
    ckpt.close()
    assert int(state.step) == 1  # the first step already spent the budget
    stop = [r for r in history if r["split"] == "stop"]
    assert stop == [{"step": 1, "split": "stop", "reason": "time_budget", "max_seconds": 1e-9}]
    assert any(r["split"] == "eval" and r["step"] == 1 for r in history)  # evaluated where it stopped
    assert Checkpointer(tmp_path).all_steps() == [1]

    ckpt = Checkpointer(tmp_path, keep=3)  # run again: it goes on from the checkpoint to the end
    state, history = fit(TrainState.create(params, tx), step, data.pipeline(src, global_batch_size=8, train=True),
                         checkpointer=ckpt, **kw)
    ckpt.close()
    assert int(state.step) == 10 and Checkpointer(tmp_path).all_steps() == [1, 5, 10]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["reason"] for r in records if r["split"] == "stop"] == ["time_budget"]

"""Checkpointer: round trips, retention, trainable-only checkpoints, clear errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import tree
from jaxfer.train.checkpoint import Checkpointer, CheckpointError, initial_state
from jaxfer.train.state import TrainState

BACKBONE = 128  # a 128x128 "pretrained" kernel dwarfs the 128x3 head


def make_params(seed=0, classes=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "backbone": {"kernel": jax.random.normal(k1, (BACKBONE, BACKBONE))},
        "head": {"kernel": jax.random.normal(k2, (BACKBONE, classes)), "bias": jnp.zeros(classes)},
    }


TRAINABLE = {"backbone": {"kernel": False}, "head": {"kernel": True, "bias": True}}


def frozen_backbone_tx():
    labels = jax.tree.map(lambda t: "train" if t else "freeze", TRAINABLE)
    return optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)


def make_state(seed=0, tx=None, classes=3):
    params = make_params(seed, classes)
    return TrainState.create(params, tx or optax.adam(1e-2), rng=jax.random.key(seed),
                             model_state={"batch_stats": {"mean": jnp.arange(4.0)}})


def advance(state, tx):
    """One optimizer update, a new rng and new model state: every field changes."""
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    rng, _ = jax.random.split(state.rng)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, rng=rng,
                         model_state=jax.tree.map(lambda x: x + 1, state.model_state))


def assert_states_equal(a, b):
    assert jnp.issubdtype(b.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
    a_flat = tree.flatten(a.replace(rng=None))
    b_flat = tree.flatten(b.replace(rng=None))
    assert a_flat.keys() == b_flat.keys()
    for path in a_flat:
        np.testing.assert_array_equal(a_flat[path], b_flat[path], err_msg=path)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_roundtrip_concrete_and_abstract_template(tmp_path):
    tx = optax.adam(1e-2)
    state = advance(advance(make_state(0, tx), tx), tx)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(2, state, data_state={"epoch": 1, "index": 3, "seed": 0},
                         metrics={"accuracy": np.float32(0.5)}, config={"lr": 1e-2})
        assert not ckpt.save(2, state)  # already there
        ckpt.wait()
        restored, data_state, metrics = ckpt.restore(make_state(1, tx))
        assert_states_equal(state, restored)
        assert data_state == {"epoch": 1, "index": 3, "seed": 0}
        assert metrics == {"accuracy": 0.5}
        abstract = jax.eval_shape(lambda: make_state(1, tx))
        restored, _, _ = ckpt.restore(abstract)
        assert_states_equal(state, restored)
        assert os.path.isdir(tmp_path / "checkpoints" / "2" / "config")


def test_initial_state_precedence(tmp_path):
    tx = optax.adam(1e-2)
    init = make_state(0, tx)
    ckpt = Checkpointer(tmp_path)
    state, data_state, resumed = initial_state(ckpt, init)
    assert state is init and data_state is None and not resumed
    ckpt.save(1, advance(init, tx), data_state={"epoch": 0, "index": 1, "seed": 0})
    ckpt.wait()
    state, data_state, resumed = initial_state(Checkpointer(tmp_path), make_state(5, tx))
    assert resumed and int(state.step) == 1 and data_state["index"] == 1
    assert initial_state(None, init) == (init, None, False)


def test_latest_and_best_retention(tmp_path):
    state, scores = make_state(), [0.1, 0.9, 0.3, 0.2, 0.4]
    ckpt = Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="acc")
    for step, acc in enumerate(scores, start=1):
        ckpt.save(step, state.replace(step=jnp.int32(step)), metrics={"acc": acc})
    ckpt.save(6, state.replace(step=jnp.int32(6)))  # no metrics: never "best"
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=2, keep_best=1, best_metric="acc")
    assert ckpt.all_steps() == [2, 5, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "5", "6"]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
    restored, _, metrics = ckpt.restore(make_state(), best=True)
    assert int(restored.step) == 2 and metrics == {"acc": 0.9}
    low = Checkpointer(tmp_path, best_metric="acc", best_mode="min")
    assert low.best_step() == 5


def test_trainable_only_is_small_and_merges_into_pretrained(tmp_path):
    tx = frozen_backbone_tx()
    pretrained = make_state(0, tx)
    trained = advance(advance(pretrained, tx), tx)
    np.testing.assert_array_equal(trained.params["backbone"]["kernel"],
                                  pretrained.params["backbone"]["kernel"])
    full, small = Checkpointer(tmp_path / "full"), Checkpointer(tmp_path / "small", trainable=TRAINABLE)
    for ckpt in (full, small):
        ckpt.save(2, trained)
        ckpt.close()
    full_bytes, small_bytes = dir_bytes(tmp_path / "full"), dir_bytes(tmp_path / "small")
    assert full_bytes > BACKBONE * BACKBONE * 4  # the frozen kernel alone is 64 KiB
    assert small_bytes < full_bytes / 3, (small_bytes, full_bytes)
    restored, _, _ = Checkpointer(tmp_path / "small", trainable=TRAINABLE).restore(make_state(0, tx))
    assert_states_equal(trained, restored)
    # the frozen leaves come from the template: another "pretrained" gives other backbone
    other, _, _ = Checkpointer(tmp_path / "small").restore(make_state(7, tx))
    np.testing.assert_array_equal(other.params["head"]["kernel"], trained.params["head"]["kernel"])
    assert not np.array_equal(other.params["backbone"]["kernel"], trained.params["backbone"]["kernel"])
    with pytest.raises(CheckpointError, match=r"concrete \(pretrained\)[\s\S]*params/backbone/kernel"):
        Checkpointer(tmp_path / "small").restore(jax.eval_shape(lambda: make_state(0, tx)))


SHARDED_RESTORE = """
import jax, jax.numpy as jnp, numpy as np, optax, sys
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.state import TrainState
mesh = Mesh(np.array(jax.devices()), ("data",))
def shard(x):
    spec = P(None, "data") if x.ndim == 2 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
def make(seed):
    params = {"w": jax.random.normal(jax.random.key(seed), (4, 6)), "b": jnp.zeros(6)}
    return jax.tree.map(shard, TrainState.create(params, optax.adam(1e-2), rng=seed))
state = make(0)
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, state)
ckpt.wait()
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), make(1))
restored, _, _ = ckpt.restore(abstract)
for got, want, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert got.sharding == want.sharding, (got.sharding, want.sharding)
    if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):
        got, ref = jax.random.key_data(got), jax.random.key_data(ref)
    np.testing.assert_array_equal(got, ref)
assert restored.params["w"].addressable_shards[0].data.shape == (4, 3)
print("ok")
"""


def test_restore_onto_template_shardings(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_mismatched_template_names_paths(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state())
    ckpt.wait()
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(make_state(classes=4))
    msg = str(err.value)
    assert "params/head/kernel: (128, 3) vs (128, 4)" in msg
    assert "opt_state/0/mu/head/bias: (3,) vs (4,)" in msg
    assert str(tmp_path / "checkpoints" / "1") in msg
    extra = make_state()
    extra = extra.replace(params={**extra.params, "adapter": {"scale": jnp.ones(2)}})
    with pytest.raises(CheckpointError, match=r"in the template but not in the checkpoint[\s\S]*params/adapter/scale"):
        ckpt.restore(extra)
    with pytest.raises(CheckpointError, match="no checkpoint at step 9"):
        ckpt.restore(make_state(), step=9)
    with pytest.raises(CheckpointError, match="no checkpoint at all"):
        Checkpointer(tmp_path / "empty").restore(make_state())


def _data_files(step_dir):
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
            if os.sep + "d" + os.sep in os.path.join(r, f)]


@pytest.mark.parametrize("damage", ["delete_data", "truncate_data", "truncate_meta"])
def test_corrupt_checkpoint_strict_refuses_else_falls_back_to_newest_readable(tmp_path, damage, caplog):
    tx = optax.adam(1e-2)
    state = make_state(0, tx)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(2, advance(state, tx))
    ckpt.wait()
    step_dir = tmp_path / "checkpoints" / "2"
    if damage == "truncate_meta":
        victims = [step_dir / "meta" / f for f in os.listdir(step_dir / "meta") if f != "commit_success.txt"]
    else:
        victims = _data_files(step_dir)
    assert victims
    for victim in victims:
        if damage == "delete_data":
            os.remove(victim)
        else:
            with open(victim, "r+b") as f:
                f.truncate(max(0, os.path.getsize(victim) // 2 - 1))
    before = sorted(os.walk(tmp_path))
    with pytest.raises(CheckpointError) as err:  # train.strict_resume=True: today's refusal
        initial_state(Checkpointer(tmp_path, keep=2), make_state(0, tx), strict=True)
    msg = str(err.value)
    assert str(step_dir) in msg and "partial or corrupt" in msg and "step=" in msg
    assert sorted(os.walk(tmp_path)) == before  # nothing deleted
    restored, _, _ = Checkpointer(tmp_path, keep=2).restore(make_state(0, tx), step=1)
    assert_states_equal(state, restored)
    # the default: resume from the newest readable checkpoint, naming both
    ckpt = Checkpointer(tmp_path, keep=2)
    with caplog.at_level("WARNING"):
        restored, _, resumed = initial_state(ckpt, make_state(0, tx))
    assert resumed and int(restored.step) == int(state.step)
    assert_states_equal(state, restored)
    warning = caplog.text
    assert str(step_dir) in warning and str(tmp_path / "checkpoints" / "1") in warning
    aside = os.listdir(tmp_path / "checkpoints.unreadable")  # kept for inspection, not deleted
    assert len(aside) == 1 and aside[0].startswith("2-")
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, advance(state, tx))  # the step is saved again, not skipped
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]


def test_no_readable_checkpoint_at_all_is_an_error(tmp_path):
    state = make_state(0)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    for victim in _data_files(tmp_path / "checkpoints" / "1"):
        os.remove(victim)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        initial_state(Checkpointer(tmp_path), make_state(0))

"""bfloat16 compute with float32 master weights; frozen leaves stored in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfer import masks
from jaxfer.train import TrainState, linen_apply, losses, make_eval_step, make_train_step
from jaxfer.train.state import cast_frozen
from tests.stand_ins import tiny_bert_task


def _leaves(t):
    return jax.tree_util.tree_leaves(t)


def test_bf16_compute_keeps_float32_master_weights_and_tracks_the_float32_step():
    model, params, batch = tiny_bert_task()
    rules = [("bert/encoder/layer/1/**", 1.0), ("classifier/**", 1.0), ("**", None)]
    trainable = masks.trainable_mask(params, rules)
    tx = optax.adam(1e-2)
    apply_fn, loss_fn = linen_apply(model), losses.softmax_cross_entropy()
    f32 = make_train_step(apply_fn, loss_fn, tx, trainable, donate=False)
    bf16 = make_train_step(apply_fn, loss_fn, tx, trainable, donate=False, compute_dtype=jnp.bfloat16)
    state = TrainState.create(params, tx, rng=0)
    (s32, m32), (s16, m16) = f32(state, batch), bf16(state, batch)
    assert all(x.dtype == jnp.float32 for x in _leaves((s16.params, s16.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2 * abs(float(m32["loss"]))
    assert abs(float(m16["grad_norm"]) / float(m32["grad_norm"]) - 1) < 0.05
    for a, b, t in zip(_leaves(state.params), _leaves(s16.params), _leaves(trainable)):
        if not t:  # frozen: bit-identical, even through a bf16 step
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ev = make_eval_step(apply_fn, loss_fn, compute_dtype=jnp.bfloat16)(state, batch)
    assert ev["logits"].dtype == jnp.float32
    np.testing.assert_allclose(ev["logits"], make_eval_step(apply_fn, loss_fn)(state, batch)["logits"], atol=3e-2)


def test_frozen_leaves_stored_in_bf16_pass_through_and_train_the_same():
    model, params, batch = tiny_bert_task()
    rules = [("classifier/**", 1.0), ("**", None)]
    trainable = masks.trainable_mask(params, rules)
    small = cast_frozen(params, trainable, jnp.bfloat16)
    dtypes = {(t, x.dtype) for x, t in zip(_leaves(small), _leaves(trainable))}
    assert dtypes == {(True, np.dtype(jnp.float32)), (False, np.dtype(jnp.bfloat16))}
    tx = optax.adam(1e-2)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, trainable, donate=False)
    state = TrainState.create(small, tx, rng=0)
    new, m = step(state, batch)
    for a, b in zip(_leaves(state.params), _leaves(new.params)):
        assert a.dtype == b.dtype
    for a, b, t in zip(_leaves(state.params), _leaves(new.params), _leaves(trainable)):
        if not t:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, m32 = step(TrainState.create(params, tx, rng=0), batch)
    assert abs(float(m["loss"]) - float(m32["loss"])) < 2e-2 * abs(float(m32["loss"]))

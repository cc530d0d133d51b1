"""The hash-bits dropout PRNG: uniform bits at every width, keys derived as threefry's, dropout through
Flax with it, and ``make_train_step(dropout_rng="hash")`` (state and checkpoints keep the threefry key)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer.train import TrainState, linen_apply, losses, make_train_step
from jaxfer.train.rng import HASH_IMPL, dropout_key, hash_bits


def test_bits_are_uniform_and_keys_independent():
    key = dropout_key(jax.random.key(3))
    bits = np.asarray(jax.random.bits(key, (1 << 18,)))
    assert bits.dtype == np.uint32 and len(np.unique(bits)) == bits.size  # a bijection of the counter
    ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32).mean(0)
    assert np.all(np.abs(ones - 0.5) < 0.01), ones  # every bit position fair
    counts = np.bincount(bits.view(np.uint8), minlength=256)
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 350, chi2  # 255 degrees of freedom: p ~ 1e-4 at 350
    # neighbouring keys (fold_in, split) give uncorrelated masks: agreement p^2 + (1-p)^2
    a, b = (np.asarray(jax.random.bernoulli(k, 0.9, (1 << 18,)))
            for k in (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)))
    assert abs(a.mean() - 0.9) < 0.003 and abs((a == b).mean() - 0.82) < 0.003
    c, d = jax.random.split(key)
    assert abs(np.corrcoef(np.asarray(jax.random.uniform(c, (1 << 16,))),
                           np.asarray(jax.random.uniform(d, (1 << 16,))))[0, 1]) < 0.02


def test_widths_and_key_derivation():
    data = jnp.asarray([7, 11], jnp.uint32)
    for width, dtype in ((8, jnp.uint8), (16, jnp.uint16), (32, jnp.uint32)):
        out = hash_bits(data, width, (3, 5))
        assert out.shape == (3, 5) and out.dtype == dtype
    assert np.array_equal(hash_bits(data, 8, (4,)), hash_bits(data, 32, (4,)) >> 24)
    key = dropout_key(jax.random.key(5))
    assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl=HASH_IMPL))
    # keys are derived as threefry's: the same data after split and fold_in
    three = jax.random.key(5)
    assert np.array_equal(jax.random.key_data(jax.random.split(key, 3)),
                          jax.random.key_data(jax.random.split(three, 3)))
    assert np.array_equal(jax.random.key_data(jax.random.fold_in(key, 9)),
                          jax.random.key_data(jax.random.fold_in(three, 9)))
    assert np.array_equal(jax.random.key_data(dropout_key(jax.random.key_data(three))), jax.random.key_data(key))
    with pytest.raises(ValueError, match="2 uint32 words"):
        dropout_key(jnp.zeros((4,), jnp.uint32))


def test_flax_dropout_with_hash_key():
    x = jnp.ones((64, 256))
    drop = nn.Dropout(0.25)
    a = drop.apply({}, x, deterministic=False, rngs={"dropout": dropout_key(jax.random.key(0))})
    b = drop.apply({}, x, deterministic=False, rngs={"dropout": dropout_key(jax.random.key(0))})
    c = drop.apply({}, x, deterministic=False, rngs={"dropout": dropout_key(jax.random.key(1))})
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    kept = np.asarray(a) != 0
    assert abs(kept.mean() - 0.75) < 0.01 and np.allclose(np.asarray(a)[kept], 1 / 0.75)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = nn.Dropout(0.5)(nn.relu(nn.Dense(32)(x)), deterministic=not train)
        return nn.Dense(3)(x)


def test_train_step_with_hash_dropout():
    model = Net()
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    batch = {"x": x, "label": np.arange(16) % 3}
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.sgd(0.1)
    results = {}
    for impl in ("threefry", "hash", "hash", "default"):
        kw = {} if impl == "default" else {"dropout_rng": impl}
        step = make_train_step(linen_apply(model, ("x",)), losses.softmax_cross_entropy(), tx, **kw)
        state, metrics = step(TrainState.create(params, tx, rng=1), batch)
        assert jax.random.key_impl(state.rng) == jax.random.key_impl(jax.random.key(0))  # state keeps threefry
        assert np.isfinite(metrics["loss"])
        results.setdefault(impl, []).append(float(metrics["loss"]))
    assert results["hash"][0] == results["hash"][1] == results["default"][0]  # deterministic; the default
    assert results["hash"][0] != results["threefry"][0]  # other masks
    with pytest.raises(ValueError, match="dropout_rng must be one of"):
        make_train_step(linen_apply(model, ("x",)), losses.softmax_cross_entropy(), tx, dropout_rng="philox")

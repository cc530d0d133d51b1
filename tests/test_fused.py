"""jaxfer.models.fused: the same numbers as flax's LayerNorm, the exact GELU and nn.Dense (values and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfer.models import fused


def _x(shape=(3, 5, 24), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1)


def test_layer_norm_matches_flax_values_and_gradients():
    x = _x()
    ours, theirs = fused.LayerNorm(epsilon=1e-12), nn.LayerNorm(epsilon=1e-12)
    v = theirs.init(jax.random.key(0), x)
    r = np.random.default_rng(1)
    v = {"params": {"scale": jnp.asarray(r.standard_normal(24), jnp.float32),
                    "bias": jnp.asarray(r.standard_normal(24), jnp.float32)}}
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(v)
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), atol=1e-5)
    w = _x((3, 5, 24), seed=2)  # a loss that weighs every output differently
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)) * w)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
    g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(v, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_gelu_matches_the_exact_gelu_and_its_gradient():
    x = jnp.linspace(-8, 8, 4001, dtype=jnp.float32)
    np.testing.assert_allclose(fused.gelu(x), nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: fused.gelu(x).sum())(x),
                               jax.grad(lambda x: nn.gelu(x, approximate=False).sum())(x), atol=1e-5)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(fused.gelu(x), torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy(),
                               atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(24, 40), (40, 24)])  # both branches: x^T dy and (dy^T x)^T
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_dot_general_is_nn_dense_with_the_same_gradients(n_in, n_out, dtype):
    x = _x((3, 5, n_in)).astype(dtype)
    ours = nn.Dense(n_out, dot_general=fused.dense_dot_general)
    theirs = nn.Dense(n_out)
    v = theirs.init(jax.random.key(0), x)
    v = jax.tree_util.tree_map(lambda p: p + 0.1, v)  # a non-zero bias
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(v)
    np.testing.assert_array_equal(ours.apply(v, x), theirs.apply(v, x))  # the forward pass is the same program
    w = _x((3, 5, n_out), seed=3)
    loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)) * w)
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
    g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(v, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5 if dtype == jnp.float32 else 2e-2, atol=1e-5)


def test_dense_dot_general_passes_other_contractions_to_lax():
    a, b = _x((4, 6)), _x((6, 4), seed=1)
    other = (((0,), (1,)), ((), ()))
    np.testing.assert_array_equal(fused.dense_dot_general(a, b, other), jax.lax.dot_general(a, b, other))
    g = jax.grad(lambda a: jnp.sum(fused.dense_dot_general(a, b, other) ** 2))(a)
    np.testing.assert_allclose(g, jax.grad(lambda a: jnp.sum(jax.lax.dot_general(a, b, other) ** 2))(a), rtol=1e-6)

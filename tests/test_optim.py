import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxfer import masks as M
from jaxfer import optim, tree

L = 4


def toy_params(seed=0):
    """4-layer BERT-shaped toy tree, float32."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": f(6, 4)}, "LayerNorm": {"scale": f(4), "bias": f(4)}},
            "encoder": {"layer": {str(i): {"dense": {"kernel": f(4, 4), "bias": f(4)},
                                           "LayerNorm": {"scale": f(4), "bias": f(4)}} for i in range(L)}},
            "pooler": {"dense": {"kernel": f(4, 4), "bias": f(4)}},
        },
        "classifier": {"kernel": f(4, 3), "bias": f(3)},
    }


FROZEN_BOTTOM = [("classifier/**", 1.0), ("bert/pooler/**", 1.0), (M.layers(2), 1.0), ("**", None)]


def random_like(t, seed):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(t))))
    return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), t)


def flat(t):
    return {p: np.asarray(x) for p, x in tree.flatten(t).items()}


def test_frozen_leaves_bit_identical_and_no_state():
    params = toy_params()
    tx = optim.build(optax.adamw(1e-2, weight_decay=0.1, mask=M.default_weight_decay_mask), FROZEN_BOTTOM)
    state = tx.init(params)
    trainable = tree.flatten(M.trainable_mask(params, FROZEN_BOTTOM))

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p = params
    for i in range(5):
        p, state = step(p, state, random_like(params, i))
    before, after = flat(params), flat(p)
    assert any(trainable.values()) and not all(trainable.values())
    for path, is_trainable in trainable.items():
        same = np.array_equal(before[path], after[path])
        assert same != is_trainable, path
    n_trainable = sum(x.size for path, x in before.items() if trainable[path])
    state_arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]  # drop scalar counts
    assert tree.nbytes(state_arrays) == 2 * 4 * n_trainable


def test_update_accepts_full_trees_and_trees_without_frozen_leaves():
    params = toy_params()
    tx = optim.build(optax.adamw(1e-2, weight_decay=0.1, mask=M.default_weight_decay_mask), FROZEN_BOTTOM,
                     clip_norm=1.0)
    state = tx.init(params)
    mask = M.trainable_mask(params, FROZEN_BOTTOM)
    grads = random_like(params, 1)
    full, full_state = jax.jit(tx.update)(grads, state, params)
    g_t, _ = tree.partition(grads, mask)
    p_t, _ = tree.partition(params, mask)
    part, part_state = jax.jit(tx.update)(g_t, state, p_t)
    full, part = flat(full), tree.flatten(part)
    assert set(part) == {p for p, m in tree.flatten(mask).items() if m}  # frozen updates stay None
    for path, u in full.items():
        if path in part:
            np.testing.assert_array_equal(u, np.asarray(part[path]))
        else:
            assert not u.any()  # frozen updates are exact zeros
    jax.tree.map(np.testing.assert_array_equal, full_state, part_state)
    # a trainable leaf with no gradient is an error, not a silent zero
    g_missing = dict(g_t, classifier={"kernel": None, "bias": g_t["classifier"]["bias"]})
    with pytest.raises(ValueError, match="classifier/kernel"):
        tx.update(g_missing, state, p_t)


def test_lr_multipliers_scale_sgd_updates_exactly():
    params = toy_params()
    rules = [("classifier/**", 2.0), (M.layers(3), 0.5), (M.bias(), 0.25), ("**", None)]
    tx = optim.build(optax.sgd(1.0), rules)
    grads = random_like(params, 2)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    mult = tree.flatten(M.lr_multipliers(params, rules))
    assert mult["bert/encoder/layer/0/dense/bias"] == 0.25 and mult["bert/encoder/layer/0/dense/kernel"] == 0.0
    for path, u in flat(updates).items():
        np.testing.assert_array_equal(u, -mult[path] * np.asarray(tree.flatten(grads)[path]), err_msg=path)


def test_layer_wise_decay_exact():
    params = toy_params()
    tx = optim.build(optax.sgd(1.0), layer_decay=0.5, num_layers=L)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    got = {p: float(u.reshape(-1)[0]) for p, u in flat(updates).items()}
    expected = {
        "bert/embeddings/word_embeddings/embedding": -1 / 32,  # layer id 0: 0.5 ** 5
        "bert/embeddings/LayerNorm/scale": -1 / 32,
        "bert/encoder/layer/0/dense/kernel": -1 / 16,  # layer 0 (id 1): 0.5 ** 4
        "bert/encoder/layer/1/dense/kernel": -1 / 8,
        "bert/encoder/layer/2/LayerNorm/bias": -1 / 4,
        "bert/encoder/layer/3/dense/bias": -1 / 2,
        "bert/pooler/dense/kernel": -1.0,  # above the top layer: id L + 1
        "classifier/bias": -1.0,
    }
    for path, value in expected.items():
        assert got[path] == value, path
    with pytest.raises(ValueError, match="num_layers"):
        optim.build(optax.sgd(1.0), layer_decay=0.5)
    with pytest.raises(ValueError, match="layer 3, but num_layers=3"):
        optim.build(optax.sgd(1.0), layer_decay=0.5, num_layers=3).init(params)


def test_weight_decay_skips_bias_and_norm():
    params = jax.tree.map(np.ones_like, toy_params())
    tx = optim.build(optax.adamw(1.0, weight_decay=0.5, mask=M.default_weight_decay_mask))
    zeros = jax.tree.map(jnp.zeros_like, params)  # adam part is 0: only decay moves params
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, u in flat(updates).items():
        decayed = not (path.endswith("bias") or "LayerNorm" in path)
        np.testing.assert_array_equal(u, -0.5 if decayed else 0.0, err_msg=path)
    assert flat(updates)["bert/embeddings/word_embeddings/embedding"].min() == -0.5


def test_clip_norm_over_trainable_leaves_only():
    params = toy_params()
    tx = optim.build(optax.sgd(1.0), FROZEN_BOTTOM, clip_norm=1.0)
    mask = tree.flatten(M.trainable_mask(params, FROZEN_BOTTOM))
    grads = {p: (np.full_like(x, 3.0) if mask[p] else np.full_like(x, 1e6)) for p, x in flat(params).items()}
    n_t = sum(g.size for p, g in grads.items() if mask[p])
    updates, _ = tx.update(tree.unflatten(grads), tx.init(params), params)
    norm = 3.0 * np.sqrt(n_t)
    for path, u in flat(updates).items():
        np.testing.assert_allclose(u, -3.0 / norm if mask[path] else 0.0, rtol=1e-6, err_msg=path)
    small = jax.tree.map(lambda x: 1e-3 * np.ones_like(x), params)  # under the threshold: untouched
    u_small, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(flat(u_small)["classifier/kernel"], -1e-3, rtol=1e-6)


def test_schedules():
    lr, T, W = 0.1, 100, 10
    at = lambda s, *steps: [float(s(t)) for t in steps]
    np.testing.assert_allclose(at(optim.schedule("constant", lr, T), 0, 50, 100), [lr, lr, lr])
    np.testing.assert_allclose(at(optim.schedule("warmup_constant", lr, T, W), 0, 5, 10, 100), [0, lr / 2, lr, lr])
    np.testing.assert_allclose(at(optim.schedule("warmup_linear", lr, T, W), 0, 5, 10, 55, 100, 200),
                               [0, lr / 2, lr, lr / 2, 0, 0], atol=1e-9)
    np.testing.assert_allclose(at(optim.schedule("warmup_cosine", lr, T, W, end_factor=0.1), 0, 10, 55, 100),
                               [0, lr, 0.55 * lr, 0.1 * lr], rtol=1e-6)
    np.testing.assert_allclose(at(optim.schedule("warmup_cosine", lr, T), 0, 100), [lr, 0], atol=1e-9)
    with pytest.raises(ValueError, match="warmup_constant"):
        optim.schedule("constant", lr, T, W)
    with pytest.raises(ValueError, match="known: constant"):
        optim.schedule("cosine", lr, T)


def cfg(**kw):
    base = dict(name="adamw", lr=1e-3, schedule="warmup_linear", warmup_steps=2, weight_decay=0.01,
                clip_norm=1.0, layer_decay=0.0)
    return ml_collections.ConfigDict({**base, **kw})


def test_from_config():
    params = toy_params()
    tx, sched = optim.from_config(cfg(layer_decay=0.8), FROZEN_BOTTOM, total_steps=10, num_layers=L)
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(1e-3)
    updates, _ = jax.jit(tx.update)(random_like(params, 3), tx.init(params), params)
    u = flat(updates)
    assert not u["bert/encoder/layer/0/dense/kernel"].any() and not u["classifier/kernel"].any()  # step 0: lr 0
    for name in optim.OPTIMIZERS:
        wd = 0.0 if name == "adam" else 0.01
        tx, _ = optim.from_config(cfg(name=name, weight_decay=wd), total_steps=10)
        tx.update(random_like(params, 4), tx.init(params), params)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamz'; known: adam, adamw, lamb, lion, sgd"):
        optim.from_config(cfg(name="adamz"), total_steps=10)
    with pytest.raises(ValueError, match="num_layers"):
        optim.from_config(cfg(layer_decay=0.8), total_steps=10)


def test_init_checks_rules_against_params():
    params = toy_params()
    with pytest.raises(tree.NoMatchError, match="clasifier"):
        optim.build(optax.sgd(1.0), [("clasifier/**", 1.0), ("**", None)]).init(params)
    with pytest.raises(M.ShadowedRuleError):
        optim.build(optax.sgd(1.0), [("**", 1.0), ("classifier/**", None)]).init(params)

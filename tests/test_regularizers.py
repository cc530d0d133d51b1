"""L2-SP (zero at the pretrained point, gradient alpha (theta - theta0), state for trainable leaves
only), BSS and distillation terms, BitFit / LayerNorm-tuning presets; frozen leaves bit-identical."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import masks, optim, tree
from jaxfer.train import TrainState, linen_apply, losses, make_train_step
from jaxfer.transfer import lora, presets, regularizers as reg
from tests import stand_ins

NEW = "classifier/**"


def perturbed(params, seed=1, scale=0.01):
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + scale * r.normal(size=x.shape).astype(x.dtype), params)


def test_l2_sp_is_zero_at_the_pretrained_point_and_its_gradient_is_alpha_theta_minus_theta0():
    _, theta0, _ = stand_ins.tiny_bert_task()
    alpha, beta = 0.3, 0.05
    tx = reg.l2_sp(alpha, beta, new=NEW)
    state = tx.init(theta0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, theta0)
    assert float(reg.l2_sp_penalty(theta0, theta0, alpha, 0.0)) == 0.0
    at0, _ = tx.update(zeros, state, theta0)
    for path, g in tree.flatten(at0).items():
        if not path.startswith("classifier/"):
            assert not np.any(np.asarray(g)), path  # exactly zero at theta0
    theta = perturbed(theta0)
    grads = jax.grad(lambda p: reg.l2_sp_penalty(p, theta0, alpha, beta, new=NEW))(theta)
    added, _ = tx.update(zeros, state, theta)
    t, t0, g, a = (tree.flatten(x) for x in (theta, theta0, grads, added))
    for path in t:
        want = beta * t[path] if path.startswith("classifier/") else alpha * (t[path] - t0[path])
        np.testing.assert_allclose(g[path], want, rtol=1e-5, atol=1e-8, err_msg=path)
        np.testing.assert_allclose(a[path], want, rtol=1e-5, atol=1e-8, err_msg=path)
    # the incoming gradient is kept: g + alpha (theta - theta0)
    ones = jax.tree_util.tree_map(jnp.ones_like, theta0)
    plus, _ = tx.update(ones, state, theta)
    np.testing.assert_allclose(tree.flatten(plus)["bert/pooler/dense/kernel"], 1 + a["bert/pooler/dense/kernel"],
                               rtol=1e-6)
    assert float(reg.l2_sp_penalty(theta, theta0, alpha, beta, new=NEW)) > 0


def run_steps(params, rules, apply_fn, batch, *, inner=None, loss_fn=None, steps=3):
    tx = optim.build(inner or optax.adam(1e-2), rules)
    state = TrainState.create(params, tx)
    step = make_train_step(apply_fn, loss_fn or losses.softmax_cross_entropy(), tx,
                           masks.trainable_mask(params, rules))
    for _ in range(steps):
        state, metrics = step(state, batch)
    assert np.isfinite(metrics["loss"])
    return state


def assert_only_moved(before, after, moved_prefixes):
    before, after = tree.flatten(jax.device_get(before)), tree.flatten(jax.device_get(after))
    for path, leaf in before.items():
        expected = any(path.startswith(p) for p in moved_prefixes)
        if not expected:
            assert np.array_equal(leaf, after[path]), path  # frozen: bit-identical
        elif "/pooler/" not in path:  # the pooler is unused under mean pooling: no gradient
            assert not np.array_equal(leaf, after[path]), path


def test_l2_sp_in_a_step_keeps_frozen_leaves_and_stores_theta0_for_trainable_leaves_only():
    model, params, batch = stand_ins.tiny_bert_task()
    rules = [("bert/encoder/layer/1/**", 1.0), (NEW, 1.0), ("**", None)]
    state = run_steps(params, rules, linen_apply(model), batch,
                      inner=optax.chain(reg.l2_sp(0.1, 0.01, new=NEW), optax.adam(1e-2)))
    assert_only_moved(params, state.params, ["bert/encoder/layer/1/", "classifier/"])
    anchors = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.shape(x) == (16, 32)]
    # theta0 and Adam's two moments, for layer 1's intermediate kernel only: nothing for frozen layer 0
    assert len(anchors) == 3


@pytest.mark.parametrize("preset, moved", [
    (presets.bitfit(), lambda p: p.endswith("/bias") or p.startswith("classifier/")),
    (presets.norm_tuning(), lambda p: "LayerNorm" in p or p.startswith("classifier/")),
])
def test_bitfit_and_norm_tuning_presets_train_only_their_leaves(preset, moved):
    model, params, batch = stand_ins.tiny_bert_task()
    trainable = tree.flatten(masks.trainable_mask(params, preset))
    assert all(trainable[p] == moved(p) for p in trainable)
    state = run_steps(params, preset, linen_apply(model), batch)
    assert_only_moved(params, state.params, [p for p in trainable if trainable[p]])


def test_batch_spectral_shrinkage_is_the_smallest_singular_values_squared():
    f = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    s = np.linalg.svd(f, compute_uv=False)
    np.testing.assert_allclose(reg.batch_spectral_shrinkage(f, k=2), np.sum(s[-2:] ** 2), rtol=1e-5)
    masked = reg.batch_spectral_shrinkage(f, k=1, mask=np.array([1, 1, 1, 1, 1, 0.0]))
    np.testing.assert_allclose(masked, np.linalg.svd(f[:5], compute_uv=False)[-1] ** 2, rtol=1e-4)
    g = jax.grad(lambda x: reg.batch_spectral_shrinkage(x, 1))(jnp.asarray(f))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    with pytest.raises(ValueError, match="bss k=5"):
        reg.batch_spectral_shrinkage(f, k=5)


def test_add_terms_adds_the_weighted_term_to_the_mean_loss():
    model, params, batch = stand_ins.tiny_bert_task()
    outputs, _ = linen_apply(model)({"params": params}, batch, train=False)
    plain = losses.softmax_cross_entropy()
    combined = reg.add_terms(plain, (0.5, reg.bss(k=1)))
    (l0, w0), (l1, w1) = plain(outputs, batch), combined(outputs, batch)
    r = reg.batch_spectral_shrinkage(reg.features(outputs, batch), 1)
    np.testing.assert_allclose(np.sum(l1 * w1) / np.sum(w1), np.sum(l0 * w0) / np.sum(w0) + 0.5 * r, rtol=1e-5)
    # BSS in a step: trains, frozen leaves stay put
    rules = presets.bitfit()
    state = run_steps(params, rules, linen_apply(model), batch, loss_fn=combined)
    assert_only_moved(params, state.params, ["classifier/"] + [p for p in tree.paths(params) if p.endswith("/bias")])


def test_distillation_against_the_pretrained_model():
    model, params, batch = stand_ins.tiny_bert_task()
    apply_fn = reg.with_teacher(linen_apply(model))
    with_t = reg.add_teacher(params)
    term = reg.distillation("features")
    outputs, _ = apply_fn({"params": with_t}, batch, train=True, rng=jax.random.key(0))
    assert np.all(np.asarray(term(outputs, batch)) == 0.0)  # the student is the teacher at the start
    eval_out, _ = apply_fn({"params": with_t}, batch, train=False)
    assert "teacher" not in eval_out
    # KL on logits against numpy
    s, t = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    kl = reg.distillation("logits", kind="kl", temperature=2.0)({"logits": s, "teacher": {"logits": t}}, {})
    p, q = jax.nn.softmax(s / 2), jax.nn.softmax(t / 2)
    np.testing.assert_allclose(kl, 4 * np.sum(q * (np.log(q) - np.log(p)), -1), rtol=1e-5)
    # in a step (full fine-tuning, teacher frozen): the teacher copy stays bit-identical
    rules = [("teacher/**", None), ("**", 1.0)]
    loss_fn = reg.add_terms(losses.softmax_cross_entropy(), (1.0, term))
    state = run_steps(with_t, rules, apply_fn, batch, loss_fn=loss_fn)
    after = jax.device_get(state.params)
    assert_only_moved(with_t["teacher"], after["teacher"], [])
    # LoRA: the base is the teacher, no copy
    lp, spec = lora.add(params, [("**/query/kernel", lora.LoRA(2))])
    apply_lora = reg.with_teacher(lora.wrap(linen_apply(model), spec), linen_apply(model), lora.base_params)
    state = run_steps(lp, presets.lora(), apply_lora, batch, loss_fn=loss_fn)
    assert_only_moved(lp, state.params, ["lora/", "classifier/"])

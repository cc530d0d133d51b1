"""LoRA: identity at init (bit for bit), merged = unmerged = the low-rank math, the base stays
frozen bit for bit, a small adapter file that reloads onto the base, several named adapters."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import masks, optim, tree
from jaxfer.train import TrainState, linen_apply, losses, make_train_step
from jaxfer.transfer import lora
from tests import stand_ins

QV = (("bert/encoder/layer/*/attention/self/query/kernel", lora.LoRA(2, alpha=4)),
      ("bert/encoder/layer/*/attention/self/value/kernel", lora.LoRA(2, alpha=4)))
RULES = [("lora/**", 1.0), ("classifier/**", 1.0), ("**", None)]


def tiny(seed=0):
    return stand_ins.tiny_bert_task(seed)


def logits(apply_fn, params, batch):
    return np.asarray(apply_fn({"params": params}, batch, train=False)[0]["logits"])  # eager: op caches are shared


@functools.lru_cache  # one compile per rule set for the whole module
def trained(steps=3, rules=QV, seed=0):
    model, base, batch = tiny(seed)
    params, spec = lora.add(base, rules, rng=1)
    apply_fn = lora.wrap(linen_apply(model), spec)
    tx = optim.build(optax.adam(1e-2), RULES)
    state = TrainState.create(params, tx)
    step = make_train_step(apply_fn, losses.softmax_cross_entropy(), tx, masks.trainable_mask(params, RULES))
    for _ in range(steps):
        state, _ = step(state, batch)
    return model, base, jax.device_get(state.params), spec, batch


def test_initial_lora_model_is_the_base_bit_for_bit():
    model, params, batch = tiny()
    with_lora, spec = lora.add(params, QV, rng=0)
    assert [p for p, _ in spec.targets] == [f"bert/encoder/layer/{i}/attention/self/{m}/kernel"
                                           for i in range(2) for m in ("query", "value")]
    a = with_lora["lora"]["default"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]["a"]
    assert a.shape == (16, 2) and np.any(np.asarray(a) != 0)
    base = logits(linen_apply(model), params, batch)
    assert np.array_equal(logits(lora.wrap(linen_apply(model), spec), with_lora, batch), base)
    jitted = lambda f, p: np.asarray(jax.jit(lambda p: f({"params": p}, batch, train=False)[0]["logits"])(p))
    assert np.array_equal(jitted(lora.wrap(linen_apply(model), spec), with_lora), jitted(linen_apply(model), params))


def test_training_moves_only_the_adapter_and_head_base_bit_identical():
    _, base, after, spec, _ = trained()
    before = tree.flatten(lora.init(base, spec, rng=1))
    after = tree.flatten(after)
    for path, leaf in before.items():
        moved = not np.array_equal(leaf, after[path])
        assert moved == (path.startswith("lora/") or path.startswith("classifier/")), path


def reference_logits(model, params, spec, batch):
    """LoRA the unmerged way, per Dense call: y = x W + b + s (x A) B (an independent implementation)."""
    factors = {p.rsplit("/", 1)[0]: (lo.scale, *lora._factors(params, spec, p)) for p, lo in spec.targets}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if isinstance(context.module, nn.Dense) and path in factors:
            s, a, b = factors[path]
            y = y + s * (args[0] @ a) @ b
        return y

    with nn.intercept_methods(interceptor):
        return np.asarray(linen_apply(model)({"params": lora.base_params(params)}, batch, train=False)[0]["logits"])


def test_merged_unmerged_and_low_rank_math_agree():
    model, _, params, spec, batch = trained()
    unmerged = logits(lora.wrap(linen_apply(model), spec), params, batch)
    merged_params = lora.merge(params, spec)
    assert "lora" not in merged_params
    merged = logits(linen_apply(model), merged_params, batch)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    np.testing.assert_allclose(reference_logits(model, params, spec, batch), unmerged, atol=1e-5)
    assert np.abs(unmerged - logits(linen_apply(model), lora.base_params(params), batch)).max() > 1e-4
    back = tree.flatten(lora.unmerge(merged_params, params["lora"], spec))
    for path, leaf in tree.flatten(params).items():
        np.testing.assert_allclose(back[path], leaf, atol=1e-6, err_msg=path)


def test_adapter_file_is_small_and_reloads_onto_the_base(tmp_path):
    from safetensors.numpy import save_file

    model, base, params, spec, batch = trained(rules=QV[:1])
    path = lora.save(tmp_path / "a.safetensors", params, spec, include=["classifier/**"])
    save_file({p: np.asarray(v) for p, v in tree.flatten(lora.base_params(params)).items()},
              str(tmp_path / "full.safetensors"))
    small, full = os.path.getsize(path), os.path.getsize(tmp_path / "full.safetensors")
    assert small < 0.05 * full, (small, full)
    reloaded, spec2 = lora.load(path, base)  # onto the untouched base: head and adapter come from the file
    assert spec2 == spec
    apply_fn = lora.wrap(linen_apply(model), spec)
    assert np.array_equal(logits(apply_fn, reloaded, batch), logits(apply_fn, params, batch))
    with pytest.raises(ValueError, match="already hold an adapter named 'default'"):
        lora.load(path, reloaded)
    with pytest.raises(ValueError, match="does not fit"):
        _, other, _ = tiny()
        other = tree.unflatten({p: (v if p != "classifier/kernel" else jnp.zeros((16, 5)))
                                for p, v in tree.flatten(other).items()})
        lora.load(path, other)


def test_several_named_adapters_on_one_base(tmp_path):
    model, base, batch = tiny()
    params, q = lora.add(base, [QV[0]], rng=1, name="q")
    params, v = lora.add(params, [QV[1]], rng=2, name="v")
    # give both adapters non-zero B so they change the model
    params = tree.map_with_path(lambda p, x: x + 0.05 if p.startswith("lora/") and p.endswith("/b") else x, params)
    apply_fn = linen_apply(model)
    out_q, out_v = logits(lora.wrap(apply_fn, q), params, batch), logits(lora.wrap(apply_fn, v), params, batch)
    out_qv = logits(lora.wrap(apply_fn, q, v), params, batch)
    assert np.abs(out_q - out_v).max() > 1e-4
    np.testing.assert_allclose(out_qv, logits(apply_fn, lora.merge(params, q, v), batch), atol=1e-5)
    only_q = lora.merge(params, q)
    assert set(only_q["lora"]) == {"v"}  # the other adapter stays
    np.testing.assert_allclose(logits(lora.wrap(apply_fn, v), only_q, batch), out_qv, atol=1e-5)
    # two files onto one base, the second renamed
    lora.save(tmp_path / "q.safetensors", params, q)
    lora.save(tmp_path / "v.safetensors", params, v)
    two, q2 = lora.load(tmp_path / "q.safetensors", base)
    two, v2 = lora.load(tmp_path / "v.safetensors", two, name="tweets")
    assert set(two["lora"]) == {"q", "tweets"} and v2.name == "tweets"
    np.testing.assert_allclose(logits(lora.wrap(apply_fn, q2, v2), two, batch), out_qv, atol=1e-6)


def test_rules_that_select_nothing_or_non_kernels_are_errors():
    _, params, _ = tiny()
    with pytest.raises(tree.NoMatchError, match="query/kernel"):
        lora.targets(params, [("bert/encoder/layer/*/attention/self/querry/kernel", lora.LoRA(2))])
    with pytest.raises(masks.ShadowedRuleError):
        lora.targets(params, [("**/query/kernel", lora.LoRA(2)), ("**/layer/0/**/query/kernel", None)])
    with pytest.raises(ValueError, match="kernel with >= 2 axes"):
        lora.targets(params, [("**/query/bias", lora.LoRA(2))])
    with pytest.raises(ValueError, match="select no kernel"):
        lora.targets(params, [("**/query/kernel", None)])
    with pytest.raises(ValueError, match="rank"):
        lora.LoRA(0)
    with pytest.raises(ValueError, match="already hold"):
        p, spec = lora.add(params, QV)
        lora.init(p, spec)


def test_dropout_drops_input_rows_of_a_in_training_only():
    model, params, batch = tiny()
    params, spec = lora.add(params, [(QV[0][0], lora.LoRA(2, alpha=4, dropout=0.5))], rng=0)
    params = tree.map_with_path(lambda p, x: x + 0.1 if p.endswith("/b") else x, params)
    path = "bert/encoder/layer/0/attention/self/query/kernel"
    w = tree.flatten(params)[path]
    a, b = lora._factors(params, spec, path)
    full = 2.0 * np.asarray(a) @ np.asarray(b)
    np.testing.assert_allclose(tree.flatten(lora.merge(params, spec))[path] - w, full, atol=1e-6)
    d0 = np.asarray(tree.flatten(lora.merge(params, spec, rng=jax.random.key(0)))[path] - w)
    d1 = np.asarray(tree.flatten(lora.merge(params, spec, rng=jax.random.key(1)))[path] - w)
    kept = np.abs(d0).sum(1) > 0  # each input row is dropped (0) or kept (scaled by 1 / (1 - p))
    assert 0 < kept.sum() < 16 and not np.array_equal(d0, d1)
    np.testing.assert_allclose(d0[kept], 2.0 * full[kept], atol=1e-6)
    apply_fn = lora.wrap(linen_apply(model), spec)
    eval_out = np.asarray(apply_fn({"params": params}, batch, train=False)[0]["logits"])
    np.testing.assert_allclose(eval_out, logits(linen_apply(model), lora.merge(params, spec), batch), atol=1e-6)

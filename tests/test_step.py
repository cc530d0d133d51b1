"""Train and eval steps: frozen leaves and frozen batch norm stay put, frozen dropout is off, accumulation and
data parallel sums equal one big batch, padding is never counted, freezing saves flops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import tree
from jaxfer.models.bert import BertModel
from jaxfer.models.heads import Classifier, TaskModel
from jaxfer.train import TrainState, linen_apply, losses, make_eval_step, make_train_step
from jaxfer.train.step import frozen_batch_norm_scope, frozen_inference_scope, module_status


# ------------------------------------------------------------------ helpers
class MLP(nn.Module):
    features: tuple = (16, 16, 16, 16)
    num_classes: int = 3
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Dense(f, name=f"dense_{i}")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(self.num_classes, name="head")(x)


class ConvBN(nn.Module):
    """bn0 fixes the mode at construction, bn1 and bn2 take it per call (both Linen styles)."""

    @nn.compact
    def __call__(self, pixel_values, train: bool = False):
        x = pixel_values
        x = nn.Conv(4, (3, 3), name="conv0")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(x))
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.relu(nn.BatchNorm(name="bn1")(x, use_running_average=not train))
        x = nn.Conv(4, (3, 3), name="conv2")(x)
        x = nn.relu(nn.BatchNorm(name="bn2")(x, not train))
        return {"logits": nn.Dense(3, name="head")(x.mean((1, 2)))}


def trainable_where(params, frozen_prefixes):
    """A bool tree: False under any of ``frozen_prefixes`` (built without jaxfer.masks)."""
    return tree.map_with_path(lambda p, _: not any(p.startswith(f) for f in frozen_prefixes), params)


def partitioned(inner, trainable):
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    return optax.partition({"train": inner, "frozen": optax.set_to_zero()}, labels)


def host(x):
    return jax.tree_util.tree_map(np.array, x)


def mlp_batch(n=16, dim=8, seed=0, mask=None):
    r = np.random.default_rng(seed)
    batch = {"x": r.normal(size=(n, dim)).astype(np.float32), "label": r.integers(0, 3, size=n)}
    if mask is not None:
        batch["mask"] = np.asarray(mask, np.float32)
    return batch


def changed(a, b):
    return not np.array_equal(a, b)


# ------------------------------------------------------------------- tests
def test_frozen_bottom_half_mlp_rng_dropout_lr():
    model = MLP(dropout=0.5)
    batch = mlp_batch(mask=np.ones(16))
    params = model.init(jax.random.key(0), batch["x"])["params"]
    trainable = trainable_where(params, ["dense_0", "dense_1"])
    # lr is 0 at step 0, so steps 0 and 1 see the same params: their losses differ only by dropout
    schedule = optax.linear_schedule(0.0, 1e-2, 4)
    tx = partitioned(optax.adam(schedule), trainable)
    state = TrainState.create(params, tx, rng=1)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, trainable,
                           lr_schedule=schedule)
    before = host(state.params)
    rngs, history = [np.asarray(jax.random.key_data(state.rng))], []
    for _ in range(5):
        state, metrics = step(state, batch)
        rngs.append(np.asarray(jax.random.key_data(state.rng)))
        history.append(host(metrics))

    after = tree.flatten(host(state.params))
    mask = tree.flatten(trainable)
    for path, leaf in tree.flatten(before).items():
        if mask[path]:
            assert changed(leaf, after[path]), path
        else:
            assert np.array_equal(leaf, after[path]), path  # bit-identical, not just close
    # the optimizer holds state (adam's mu and nu) for trainable leaves only
    opt_arrays = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    trainable_count = sum(np.size(v) for p, v in after.items() if mask[p])
    assert sum(np.size(x) for x in opt_arrays) == 2 * trainable_count
    assert 0 < trainable_count < tree.count(before)

    assert len({r.tobytes() for r in rngs}) == 6  # a new key every step
    assert int(state.step) == 5
    np.testing.assert_allclose([m["lr"] for m in history], [schedule(i) for i in range(5)], rtol=1e-6)
    assert history[0]["lr"] == 0.0 and history[0]["loss"] != history[1]["loss"]  # dropout changed
    assert all(m["examples"] == 16 and np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in history)


def test_frozen_batch_norm_keeps_statistics_and_threads_through_micro_batches():
    model = ConvBN()
    r = np.random.default_rng(0)
    batch = {"pixel_values": r.normal(1.0, 2.0, size=(8, 6, 6, 2)).astype(np.float32),
             "label": r.integers(0, 3, size=8), "mask": np.ones(8, np.float32)}
    variables = model.init(jax.random.key(0), batch["pixel_values"])
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    trainable = trainable_where(params, ["conv0", "bn0", "conv1", "bn1"])
    apply_fn = linen_apply(model)

    @jax.jit  # one compile instead of many eager Linen calls
    def references(variables, batch):
        # frozen batch norms normalise with their running statistics while training
        with frozen_batch_norm_scope(frozenset({"bn0", "bn1", "bn2"})):
            train_out, train_state = apply_fn(variables, batch, train=True, rng=jax.random.key(0))
        eval_out, _ = apply_fn(variables, batch, train=False)
        # what two micro-batches in sequence do to the statistics
        expected = {"batch_stats": variables["batch_stats"]}
        with frozen_batch_norm_scope(frozenset({"bn0", "bn1"})):
            for chunk in range(2):
                part = {k: v[chunk * 4:(chunk + 1) * 4] for k, v in batch.items()}
                _, expected = apply_fn({"params": variables["params"], **expected}, part, train=True, rng=None)
        return train_out, train_state, eval_out, expected

    train_out, train_state, eval_out, expected = references(variables, batch)
    assert eval_out["logits"].shape == (8, 3)
    np.testing.assert_allclose(train_out["logits"], eval_out["logits"], rtol=1e-6)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, train_state, model_state))

    tx = partitioned(optax.sgd(0.1), trainable)
    state = TrainState.create(params, tx, model_state=model_state)
    step = make_train_step(apply_fn, losses.softmax_cross_entropy(), tx, trainable, micro_batches=2,
                           donate=False)  # the initial arrays are used again below
    new_state, _ = step(state, batch)
    stats0, stats1 = tree.flatten(host(model_state)), tree.flatten(host(new_state.model_state))
    for path in stats0:
        if path.startswith(("batch_stats/bn0", "batch_stats/bn1")):
            assert np.array_equal(stats0[path], stats1[path]), path
        else:
            assert changed(stats0[path], stats1[path]), path

    # the statistics thread through the scan: chunk 2 starts from chunk 1's update
    for path, value in tree.flatten(host(expected)).items():
        np.testing.assert_allclose(stats1[path], value, rtol=1e-5, atol=1e-6, err_msg=path)

    # without frozen_batch_norm, the frozen layers' statistics move
    loose = make_train_step(apply_fn, losses.softmax_cross_entropy(), tx, trainable, frozen_batch_norm=False,
                            donate=False)
    loose_state, _ = loose(TrainState.create(params, tx, model_state=model_state), batch)
    assert changed(stats0["batch_stats/bn0/mean"], np.asarray(loose_state.model_state["batch_stats"]["bn0"]["mean"]))


class Noise(nn.Module):
    """No parameters of its own: its dropout belongs to the enclosing module."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        return nn.Dropout(self.rate)(x, deterministic=deterministic)


class Block(nn.Module):
    """``relu(dense(x))`` then dropout, through a parameter-free child."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        return Noise(0.5, name="noise")(nn.relu(nn.Dense(8, name="dense")(x)), deterministic)


class DropoutBlocks(nn.Module):
    """``bottom`` (a block), a dropout at the root (which trains), ``top`` (its own dropout), ``head``."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        bottom = nn.Dropout(0.5)(Block(name="bottom")(x, not train), deterministic=not train)
        top = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8, name="top")(bottom)))
        return {"logits": nn.Dense(3, name="head")(top), "bottom": bottom, "top": top}


class Bottom(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Dense(3, name="head")(Block(name="bottom")(x, not train))


def test_frozen_modules_run_without_dropout():
    r = np.random.default_rng(0)
    batch = {"x": r.normal(size=(16, 8)).astype(np.float32), "label": r.integers(0, 3, 16)}
    model = DropoutBlocks()
    params = model.init(jax.random.key(0), batch["x"])["params"]
    trainable = trainable_where(params, ["bottom"])
    status = module_status(trainable)
    assert status["bottom"] and status["bottom/dense"] and not status["top"] and not status[""]
    assert "bottom/noise" not in status  # no parameters: the enclosing `bottom` decides
    # a frozen kernel that LoRA adapts (its factors live elsewhere in the tree) is not inference mode
    lora = module_status(trainable, adapted=["bottom/dense/kernel"])
    assert not lora["bottom/dense"] and not lora["bottom"] and status["bottom"]
    apply_fn = linen_apply(model)

    @jax.jit
    def outputs(params, batch):
        eval_out, _ = apply_fn({"params": params}, batch, train=False)
        with frozen_inference_scope(status):
            frozen_out, _ = apply_fn({"params": params}, batch, train=True, rng=jax.random.key(1))
        loose_out, _ = apply_fn({"params": params}, batch, train=True, rng=jax.random.key(1))
        return eval_out, frozen_out, loose_out

    eval_out, frozen_out, loose_out = host(outputs(params, batch))
    # the dropout inside the frozen block is off; the root's and the top's are on
    dense = params["bottom"]["dense"]
    x = np.maximum(batch["x"] @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]), 0)
    kept = frozen_out["bottom"] != 0
    np.testing.assert_allclose(frozen_out["bottom"][kept], 2 * x[kept], rtol=1e-5)  # one dropout
    assert 0.2 < (~kept & (x != 0)).sum() / (x != 0).sum() < 0.8
    assert changed(frozen_out["top"], eval_out["top"])
    loose_kept = loose_out["bottom"] != 0
    np.testing.assert_allclose(loose_out["bottom"][loose_kept], 4 * x[loose_kept], rtol=1e-5)  # two

    # in the step: a frozen block below a trainable head trains like evaluation; the option restores dropout
    model = Bottom()
    params = model.init(jax.random.key(0), batch["x"])["params"]
    trainable = trainable_where(params, ["bottom"])
    tx = partitioned(optax.sgd(0.0), trainable)
    eval_loss = make_eval_step(linen_apply(model), losses.softmax_cross_entropy())(
        TrainState.create(params, tx), batch)["loss"].mean()
    for frozen_dropout in (True, False):
        step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, trainable,
                               frozen_dropout=frozen_dropout, donate=False)
        _, metrics = step(TrainState.create(params, tx, rng=3), batch)
        assert np.isclose(metrics["loss"], eval_loss, rtol=1e-6) == frozen_dropout


def test_micro_batches_equal_one_batch_with_uneven_masks():
    model = MLP()
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0], np.float32)  # 4, 1, 3, 0 per chunk
    batch = mlp_batch(mask=mask)
    params = model.init(jax.random.key(0), batch["x"])["params"]
    trainable = trainable_where(params, ["dense_0", "dense_1"])
    tx = partitioned(optax.sgd(0.5), trainable)
    loss_fn = losses.softmax_cross_entropy()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    one = make_train_step(linen_apply(model), loss_fn, tx, trainable, state_sharding=device,
                          batch_sharding=device, donate=False)
    four = make_train_step(linen_apply(model), loss_fn, tx, trainable, micro_batches=4, donate=False)
    s1 = s4 = TrainState.create(params, tx)
    for _ in range(2):
        s1, m1 = one(s1, batch)
        s4, m4 = four(s4, batch)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    assert m1["examples"] == m4["examples"] == mask.sum()

    with pytest.raises(ValueError, match="batch size 16 is not divisible by micro_batches=3"):
        make_train_step(linen_apply(model), loss_fn, tx, trainable, micro_batches=3, jit=False)(s1, batch)


def test_axis_name_sums_replicas_into_the_global_batch():
    model = MLP()
    mask = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0], np.float32)
    batch = mlp_batch(mask=mask)
    params = model.init(jax.random.key(0), batch["x"])["params"]
    trainable = trainable_where(params, ["dense_0"])
    tx = partitioned(optax.sgd(0.5), trainable)
    loss_fn = losses.softmax_cross_entropy()
    state = TrainState.create(params, tx)
    global_state, global_metrics = make_train_step(linen_apply(model), loss_fn, tx, trainable, donate=False)(
        state, batch)
    # vmap with an axis name runs the same collectives pmap would, without needing devices
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    split = jax.tree_util.tree_map(lambda x: x.reshape((2, 8) + x.shape[1:]), batch)
    per_replica = make_train_step(linen_apply(model), loss_fn, tx, trainable, axis_name="d")
    rep_state, rep_metrics = jax.jit(jax.vmap(per_replica, axis_name="d"))(replicated, split)
    for a, b in zip(jax.tree_util.tree_leaves(global_state.params), jax.tree_util.tree_leaves(rep_state.params)):
        np.testing.assert_allclose(b[0], a, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(b[0], b[1])
    np.testing.assert_allclose(rep_metrics["loss"], [global_metrics["loss"]] * 2, rtol=1e-5)
    np.testing.assert_array_equal(rep_metrics["examples"], [mask.sum()] * 2)

    # batch statistics: averaged over replicas when trainable, untouched when frozen
    conv = ConvBN()
    images = np.random.default_rng(1).normal(size=(2, 4, 6, 6, 2)).astype(np.float32)
    variables = conv.init(jax.random.key(0), images[0])
    trainable = trainable_where(variables["params"], ["conv0", "bn0", "conv1", "bn1"])
    tx = partitioned(optax.sgd(0.1), trainable)
    state = TrainState.create(variables["params"], tx, model_state={"batch_stats": variables["batch_stats"]})
    stats0 = host(state.model_state["batch_stats"])
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    per_replica = make_train_step(linen_apply(conv), loss_fn, tx, trainable, axis_name="d")
    rep_state, _ = jax.jit(jax.vmap(per_replica, axis_name="d"))(
        replicated, {"pixel_values": images, "label": np.zeros((2, 4), np.int32)})
    stats = host(rep_state.model_state["batch_stats"])
    np.testing.assert_array_equal(stats["bn2"]["mean"][0], stats["bn2"]["mean"][1])
    assert changed(stats["bn2"]["mean"][0], stats0["bn2"]["mean"])
    for name in ("bn0", "bn1"):
        np.testing.assert_array_equal(stats[name]["var"][1], stats0[name]["var"])


def test_eval_step_counts_only_masked_in_rows():
    model = MLP()
    real = mlp_batch(n=5, seed=3)
    params = model.init(jax.random.key(0), real["x"])["params"]
    state = TrainState.create(params, optax.sgd(0.1))
    padded = {"x": np.concatenate([real["x"], 100 * np.ones((3, 8), np.float32)]),
              "label": np.concatenate([real["label"], [2, 2, 2]]),
              "mask": np.array([1] * 5 + [0] * 3, np.float32)}
    loss_fn = losses.softmax_cross_entropy()
    eval_step = make_eval_step(linen_apply(model), loss_fn)
    out = host(eval_step(state, padded))
    assert set(out) == {"loss", "weight", "logits", "label", "mask"}
    assert out["loss"].shape == out["weight"].shape == out["mask"].shape == (8,)
    np.testing.assert_array_equal(out["weight"], padded["mask"])
    np.testing.assert_array_equal(out["loss"][5:], 0.0)
    logits = model.apply({"params": params}, real["x"])
    np.testing.assert_allclose(out["logits"][:5], logits, rtol=1e-6)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, real["label"]).mean()
    np.testing.assert_allclose(out["loss"].sum() / out["weight"].sum(), ref, rtol=1e-6)

    # a plain apply_fn (no Linen) with per-token losses: summed per sequence, ignore_index skipped
    def token_apply(variables, batch, *, train, rng):
        return {"logits": batch["tokens"] @ variables["params"]["w"]}, {}

    tokens = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    labels = np.array([[0, 1, -100, -100], [2, 2, 2, -100]])
    tok = make_eval_step(token_apply, loss_fn, jit=False)(
        TrainState.create({"w": jnp.eye(3)}, optax.sgd(0.1)), {"tokens": tokens, "label": labels})
    per_token = optax.softmax_cross_entropy_with_integer_labels(tokens, np.maximum(labels, 0))
    np.testing.assert_allclose(tok["loss"], (per_token * (labels >= 0)).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(tok["weight"], [2, 3])
    np.testing.assert_array_equal(tok["mask"], [1, 1])


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_frozen_bottom_half_costs_fewer_flops():
    model = MLP(features=(128,) * 6)
    batch = mlp_batch(n=64, dim=128, mask=np.ones(64))
    params = model.init(jax.random.key(0), batch["x"])["params"]
    loss_fn = losses.softmax_cross_entropy()

    def compiled_flops(trainable):
        mask = trainable if trainable is not None else jax.tree_util.tree_map(lambda _: True, params)
        tx = partitioned(optax.adam(1e-3), mask)
        state = TrainState.create(params, tx)
        step = make_train_step(linen_apply(model), loss_fn, tx, trainable)
        return _flops(step.lower(state, batch).compile())

    full = compiled_flops(None)
    frozen = compiled_flops(trainable_where(params, ["dense_0", "dense_1", "dense_2"]))
    print(f"\nXLA flops per step: full fine-tune {full:.3g}, frozen bottom half {frozen:.3g} "
          f"(ratio {frozen / full:.2f})")
    assert frozen < 0.8 * full


def test_tiny_bert_task_model_frozen_embeddings_and_first_layer():
    config = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, hidden_act="gelu")  # dropout: tested on the MLP
    model = TaskModel(BertModel(config), Classifier(2, pooling="pooler", dropout_rate=0.0))
    r = np.random.default_rng(0)
    ids = r.integers(0, 40, size=(4, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": np.array([0, 1, 1, 0]),
             "mask": np.ones(4, np.float32)}
    # random values on the init's shapes: tracing only, no compile (an eager init takes seconds)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), input_ids=ids))["params"]
    params = jax.tree_util.tree_map(lambda x: (0.1 * r.normal(size=x.shape)).astype(x.dtype), shapes)
    trainable = trainable_where(params, ["bert/embeddings", "bert/encoder/layer/0/"])
    tx = partitioned(optax.adamw(1e-3), trainable)
    state = TrainState.create(params, tx)
    before = host(params)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, trainable)
    for _ in range(3):
        state, metrics = step(state, batch)
    mask, after = tree.flatten(trainable), tree.flatten(host(state.params))
    assert not mask["bert/encoder/layer/0/attention/self/query/kernel"]
    assert mask["bert/encoder/layer/1/attention/self/query/kernel"] and mask["classifier/kernel"]
    for path, leaf in tree.flatten(before).items():
        assert np.array_equal(leaf, after[path]) != mask[path], path
    assert np.isfinite(metrics["loss"])

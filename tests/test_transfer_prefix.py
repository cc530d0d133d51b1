"""Cached frozen prefix: the plan finds the boundary (or says why not), and training the top
on cached boundary activations ends where training through the whole model does."""

import jax
import numpy as np
import optax

from jaxfer import data, masks, tree
from jaxfer.models.heads import Classifier, TaskModel
from jaxfer.models.resnet import ResNetModel
from jaxfer.models.vit import ViTModel
from jaxfer.train import TrainState, linen_apply, losses, make_eval_step, make_train_step
from jaxfer.transfer import batches, prefix

from test_transfer_features import tiny_task_model, token_source

BERT_PATTERN = r"encoder/layer/(\d+)/"


def _tx(trainable):
    labels = jax.tree_util.tree_map(lambda t: "t" if t else "f", trainable)
    return optax.partition({"t": optax.adamw(3e-2, weight_decay=0.01), "f": optax.set_to_zero()}, labels)


def _flops(step, *args) -> float:
    cost = step.lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_cached_top2_equals_training_through_the_model(tmp_path):
    model, params = tiny_task_model(pooling="mean", dropout=0.2)
    rules = (("bert/encoder/layer/[12]/**", 1.0), ("bert/pooler/**", 1.0), ("classifier/**", 1.0), ("**", None))
    trainable = masks.trainable_mask(params, rules)
    src = token_source(48)
    train = data.pipeline(src, global_batch_size=8, train=True, seed=3)
    batch = next(data.pipeline(src, global_batch_size=8, train=True, seed=3))

    p = prefix.plan(model, {"params": params}, trainable, batch, layer_pattern=BERT_PATTERN)
    assert p.exact and p.module == "bert/encoder/layer/0" and p.layer == 1 and p.num_layers == 3
    assert "layer 0 of 3 runs once per example" in p.describe()

    # why not, in each case
    loose = prefix.plan(model, {"params": params}, trainable, batch, layer_pattern=BERT_PATTERN,
                        frozen_dropout=False)
    assert not loose.exact and "frozen_dropout is off" in loose.reason
    emb = masks.trainable_mask(params, (("bert/embeddings/LayerNorm/**", 1.0),) + rules)
    emb_plan = prefix.plan(model, {"params": params}, emb, batch, layer_pattern=BERT_PATTERN)
    assert not emb_plan.exact and "params/bert/embeddings/LayerNorm" in emb_plan.reason
    aug = prefix.plan(model, {"params": params}, trainable, batch, layer_pattern=BERT_PATTERN, augmented="mixup")
    assert not aug.exact and "randomly augmented (mixup)" in aug.reason
    first = masks.trainable_mask(params, (("bert/encoder/layer/0/**", 1.0), ("**", None)))
    assert "layer 0" in prefix.plan(model, {"params": params}, first, batch, layer_pattern=BERT_PATTERN).reason

    evals = data.pipeline(src, global_batch_size=16, train=False)
    cache = prefix.compute(model, {"params": params}, p.module, evals, directory=str(tmp_path), key="b")
    assert cache.shape == (48, 8, 16)

    loss_fn = losses.softmax_cross_entropy()
    tx = _tx(trainable)
    through = make_train_step(linen_apply(model), loss_fn, tx, trainable)
    on_cache = make_train_step(prefix.cached_apply(model, p.module), loss_fn, tx, trainable)
    cached_train = batches.with_features(data.pipeline(src, global_batch_size=8, train=True, seed=3), cache,
                                          key=prefix.BOUNDARY_KEY)
    s1, s2 = TrainState.create(params, tx, rng=5), TrainState.create(params, tx, rng=5)
    cached_batch = next(iter(batches.with_features([batch], cache, key=prefix.BOUNDARY_KEY)))
    assert _flops(on_cache, s2, cached_batch) < 0.9 * _flops(through, s1, batch)  # layer 0 is gone
    for _ in range(8):  # more than one epoch, with the top layer's dropout on
        s1, m1 = through(s1, next(train))
        s2, m2 = on_cache(s2, next(cached_train))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    a, b, before = (tree.flatten(jax.device_get(x)) for x in (s1.params, s2.params, params))
    mask = tree.flatten(trainable)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-5, err_msg=path)
        if not mask[path]:
            assert np.array_equal(a[path], before[path]) and np.array_equal(b[path], before[path]), path
        else:
            assert not np.array_equal(b[path], before[path]), path

    # evaluation on the cache equals evaluation through the model
    e1 = make_eval_step(linen_apply(model), loss_fn)
    e2 = make_eval_step(prefix.cached_apply(model, p.module), loss_fn)
    for eb, cb in zip(evals, batches.with_features(evals, cache, key=prefix.BOUNDARY_KEY)):
        np.testing.assert_allclose(e1(s2, eb)["logits"], e2(s2, cb)["logits"], atol=1e-5)


def test_resnet_stages_with_frozen_batch_norm():
    config = dict(num_channels=3, embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), layer_type="basic")
    model = TaskModel(ResNetModel(config), Classifier(3, pooling="pooler", dense_name="1"), prefix="resnet")
    r = np.random.default_rng(0)
    x = r.normal(size=(24, 16, 16, 3)).astype(np.float32)
    src = data.ArraySource({"pixel_values": x, "label": r.integers(0, 3, 24).astype(np.int32),
                            "id": np.arange(24)})
    variables = model.init(jax.random.key(0), pixel_values=x[:2])
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    trainable = masks.trainable_mask(params, (("resnet/encoder/stages/1/**", 1.0), ("classifier/**", 1.0),
                                              ("**", None)))
    batch = next(data.pipeline(src, global_batch_size=8, train=True))
    p = prefix.plan(model, {"params": params, **state}, trainable, batch, layer_pattern=r"encoder/stages/(\d+)/")
    assert p.exact and p.module == "resnet/encoder/stages/0"

    cache = prefix.compute(model, {"params": params, **state}, p.module,
                           data.pipeline(src, global_batch_size=8, train=False))
    loss_fn = losses.softmax_cross_entropy()
    tx = _tx(trainable)
    through = make_train_step(linen_apply(model), loss_fn, tx, trainable)
    on_cache = make_train_step(prefix.cached_apply(model, p.module), loss_fn, tx, trainable)
    s1 = TrainState.create(params, tx, model_state=state)
    s2 = TrainState.create(params, tx, model_state=state)
    train = data.pipeline(src, global_batch_size=8, train=True)
    cached_train = batches.with_features(data.pipeline(src, global_batch_size=8, train=True), cache,
                                          key=prefix.BOUNDARY_KEY)
    for _ in range(4):
        s1, _ = through(s1, next(train))
        s2, _ = on_cache(s2, next(cached_train))
    for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.model_state)),
                    jax.tree_util.tree_leaves((s2.params, s2.model_state))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the trainable stage's batch statistics moved; the frozen stem's did not
    stats = tree.flatten(jax.device_get(s2.model_state))
    assert np.array_equal(stats["batch_stats/resnet/embedder/embedder/normalization/mean"],
                          np.asarray(state["batch_stats"]["resnet"]["embedder"]["embedder"]["normalization"]["mean"]))
    assert not np.array_equal(stats["batch_stats/resnet/encoder/stages/1/layers/0/layer/0/normalization/mean"],
                              np.asarray(tree.flatten(state)["batch_stats/resnet/encoder/stages/1/layers/0/layer/0/"
                                                              "normalization/mean"]))



def test_vit_runs_from_a_layer():
    config = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=24, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = TaskModel(ViTModel(config), Classifier(3, pooling="cls"), prefix="vit")
    r = np.random.default_rng(0)
    x = r.normal(size=(4, 16, 16, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), pixel_values=x[:1])["params"]
    trainable = masks.trainable_mask(params, (("vit/encoder/layer/2/**", 1.0), ("vit/layernorm/**", 1.0),
                                              ("classifier/**", 1.0), ("**", None)))
    batch = {"pixel_values": x, "label": np.zeros(4, np.int32)}
    p = prefix.plan(model, {"params": params}, trainable, batch, layer_pattern=r"encoder/layer/(\d+)/")
    assert p.exact and p.module == "vit/encoder/layer/1"
    boundary = jax.jit(prefix.boundary_fn(model, p.module))({"params": params}, batch)
    through, _ = linen_apply(model)({"params": params}, batch, train=False)
    cached, _ = prefix.cached_apply(model, p.module)({"params": params}, {**batch, "boundary": boundary}, train=False)
    np.testing.assert_allclose(cached["logits"], through["logits"], atol=1e-6)


def test_speedup_message_times_steps_by_wall_time_not_dispatch(monkeypatch):
    """Steps are dispatched asynchronously: nine of ten intervals are the host's few ms and the
    tenth waits for the device. The message reports wall time per step (100 ms on the cache,
    200 ms filling it), where a median of intervals would say 4 ms and a 50x speed-up."""
    import types

    from jaxfer.transfer import caching

    cached = caching.Cached("prefix", None, None, None, None, {"train": types.SimpleNamespace(computed=0)}, "")
    hook = cached.timer()
    clock = [0.0]
    monkeypatch.setattr(caching.time, "perf_counter", lambda: clock[0])

    def steps(n, seconds, fills):
        for i in range(n):
            wait = seconds * 10 - 0.004 * 9 if i % 10 == 9 else 0.004
            clock[0] += wait
            if fills:
                cached.features["train"].computed += 32
            hook(i, None, [{"split": "train"}])

    steps(23, 0.2, fills=True)    # the first epoch fills the cache (its first 2 intervals: compiles)
    steps(40, 0.1, fills=False)   # then every step runs on it
    message = cached.speedup_message()
    assert "100 ms per step on the cache, 200 ms per step that first ran the frozen part" in message, message
    assert "2.00x faster" in message, message

"""Run by tests/test_parallel.py in a fresh process with 8 simulated CPU devices.

Trains the same tiny model for a few steps on the same batches under four
layouts — one device, data parallel over 8, FSDP (data 2 x fsdp 4), and the
pmap strategy — and prints JSON with the parameter differences against the
one-device run and how the FSDP leaves are laid out.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxfer import tree  # noqa: E402
from jaxfer.train import losses, parallel, step as step_lib  # noqa: E402
from jaxfer.train.state import TrainState  # noqa: E402

STEPS, BATCH = 3, 32


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(256, name="embed")(x))
        x = nn.relu(nn.Dense(128, name="hidden")(x))
        x = nn.LayerNorm(name="norm")(x)
        return {"logits": nn.Dense(4, name="classifier")(x)}


def batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {"x": rng.normal(size=(BATCH, 64)).astype(np.float32),
               "label": rng.integers(0, 4, BATCH).astype(np.int32),
               "mask": np.ones(BATCH, np.float32)}


def optimizer(trainable):
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    return optax.partition({"train": optax.adamw(1e-2, weight_decay=0.1),
                            "frozen": optax.set_to_zero()}, labels)


def run(strategy):
    module = MLP()
    params = module.init(jax.random.key(0), np.zeros((1, 64), np.float32))["params"]
    trainable = tree.map_with_path(lambda p, _: not p.startswith("embed/"), params)
    tx = optimizer(trainable)
    state = strategy.place_state(TrainState.create(params, tx, rng=jax.random.key(1)))
    train_step = strategy.train_step(step_lib.linen_apply(module, ("x",)),
                                     losses.softmax_cross_entropy(), tx, trainable)
    losses_seen = []
    for batch in batches():
        state, metrics = train_step(state, strategy.shard_batch(batch))
        losses_seen.append(float(metrics["loss"]))
    return state, losses_seen


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    single_state, single_losses = run(parallel.JitStrategy(parallel.make_mesh(1, 1, jax.devices()[:1])))
    ref = jax.device_get(single_state.params)
    layouts = {
        "data": parallel.JitStrategy(parallel.make_mesh(data=-1)),
        "fsdp": parallel.JitStrategy(parallel.make_mesh(data=2, fsdp=-1), min_fsdp_size=256),
        "pmap": parallel.PmapStrategy(),
    }
    for name, strategy in layouts.items():
        state, seen = run(strategy)
        params = state.params
        if name == "pmap":
            params = parallel.unreplicate(params)
        got = jax.device_get(params)
        diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), got, ref)
        out[name] = {"max_param_diff": max(jax.tree_util.tree_leaves(diffs)),
                     "loss_diff": max(abs(a - b) for a, b in zip(seen, single_losses)),
                     "frozen_equal": bool(np.array_equal(got["embed"]["kernel"], ref["embed"]["kernel"]))}
        if name == "fsdp":
            kernel = state.params["hidden"]["kernel"]
            mu = state.opt_state
            out[name]["hidden_kernel_spec"] = str(kernel.sharding.spec)
            out[name]["hidden_kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
            out[name]["hidden_kernel_shape"] = list(kernel.shape)
            specs = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(mu)
                     if hasattr(x, "sharding") and x.shape == kernel.shape]
            out[name]["adam_moment_specs"] = specs
            out[name]["bias_spec"] = str(state.params["classifier"]["bias"].sharding.spec)
    if len(sys.argv) > 1:  # a tiny BERT checkpoint: load it straight into the FSDP layout
        from jaxfer.models import heads
        from jaxfer.weights.load import load

        fsdp = parallel.JitStrategy(parallel.make_mesh(data=2, fsdp=-1), min_fsdp_size=256)
        sharded = load(sys.argv[1], head=heads.Classifier(3), place=fsdp.param_placer())
        plain = load(sys.argv[1], head=heads.Classifier(3))
        leaf = sharded.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                      sharded.params, plain.params)
        out["load"] = {"embedding_spec": str(leaf.sharding.spec),
                       "embedding_shard_shape": list(leaf.addressable_shards[0].data.shape),
                       "embedding_shape": list(leaf.shape),
                       "all_equal": all(jax.tree_util.tree_leaves(same))}
    try:
        parallel.JitStrategy(parallel.make_mesh(data=-1)).shard_batch(
            {"x": np.zeros((12, 64), np.float32)})
        out["bad_batch_error"] = None
    except ValueError as e:
        out["bad_batch_error"] = str(e)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()

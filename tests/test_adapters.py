"""Bottleneck adapters: identity at init (bit for bit), y + f(y) on the chosen modules' outputs,
BERT and ViT without touching their code, frozen leaves bit-identical, rule errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfer import masks, optim, tree
from jaxfer.models.heads import Classifier, TaskModel
from jaxfer.models.vit import ViTModel
from jaxfer.train import TrainState, linen_apply, losses, make_train_step
from jaxfer.transfer import adapters, presets
from tests import stand_ins


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        h = nn.relu(nn.Dense(8, name="dense_0")(x))
        return nn.Dense(3, name="head")(h)


def out(apply_fn, params, batch):
    return np.asarray(apply_fn({"params": params}, batch, train=False)[0]["logits"])


def test_the_adapter_adds_f_of_y_to_the_module_output():
    model = MLP()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    with_a, spec = adapters.add(params, [("dense_0/kernel", adapters.Bottleneck(2, "tanh"))], rng=1)
    assert spec.targets == (("dense_0", 8, adapters.Bottleneck(2, "tanh")),)
    apply_fn = adapters.wrap(linen_apply(model), spec)
    assert np.array_equal(out(apply_fn, with_a, {"x": x}), out(linen_apply(model), params, {"x": x}))
    with_a = tree.map_with_path(lambda p, v: v + 0.1 if p.startswith("adapters/") else v, with_a)
    a = with_a["adapters"]["default"]["dense_0"]
    y = x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    y = y + np.tanh(y @ a["down"]["kernel"] + a["down"]["bias"]) @ a["up"]["kernel"] + a["up"]["bias"]
    want = np.maximum(y, 0) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out(apply_fn, with_a, {"x": x}), want, atol=1e-5)


def test_houlsby_adapters_on_bert_train_alone_and_start_as_the_base():
    model, params, batch = stand_ins.tiny_bert_task()
    with_a, spec = adapters.add(params, adapters.houlsby(4), rng=0)
    assert sorted(m for m, _, _ in spec.targets) == sorted(
        f"bert/encoder/layer/{i}/{m}/dense" for i in range(2) for m in ("attention/output", "output"))
    apply_fn = adapters.wrap(linen_apply(model), spec)
    assert np.array_equal(out(apply_fn, with_a, batch), out(linen_apply(model), params, batch))
    rules = presets.adapters()
    tx = optim.build(optax.adam(1e-2), rules)
    trainable = masks.trainable_mask(with_a, rules)
    step = make_train_step(apply_fn, losses.softmax_cross_entropy(), tx, trainable)
    state = TrainState.create(with_a, tx)
    for _ in range(3):
        state, metrics = step(state, batch)
    before, after, mask = tree.flatten(with_a), tree.flatten(jax.device_get(state.params)), tree.flatten(trainable)
    for path, leaf in before.items():
        assert mask[path] == (path.startswith("adapters/") or path.startswith("classifier/"))
        if not mask[path]:
            assert np.array_equal(leaf, after[path]), path  # frozen: bit-identical
    assert not np.array_equal(before["adapters/default/bert/encoder/layer/1/output/dense/up/kernel"],
                              after["adapters/default/bert/encoder/layer/1/output/dense/up/kernel"])
    assert np.abs(out(apply_fn, jax.device_get(state.params), batch)
                  - out(linen_apply(model), adapters.base_params(jax.device_get(state.params)), batch)).max() > 1e-5


def test_vit_takes_the_same_rules():
    config = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=32, hidden_act="gelu")
    model = TaskModel(ViTModel(config), Classifier(2, pooling="cls"), prefix="vit")
    pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), pixel_values=pixels)["params"]
    with_a, spec = adapters.add(params, adapters.houlsby(4), rng=0)
    assert len(spec.targets) == 4
    r = np.random.default_rng(1)  # random, not constant: LayerNorm would cancel a constant shift
    with_a = tree.map_with_path(lambda p, v: v + 0.3 * r.normal(size=v.shape) if p.startswith("adapters/") else v,
                                with_a)
    apply_fn = adapters.wrap(linen_apply(model), spec)
    batch = {"pixel_values": pixels}
    hidden = lambda f, p: np.asarray(f({"params": p}, batch, train=False)[0]["last_hidden_state"])
    assert np.abs(hidden(apply_fn, with_a) - hidden(linen_apply(model), params)).max() > 1e-2


def test_rule_errors():
    _, params, _ = stand_ins.tiny_bert_task()
    with pytest.raises(tree.NoMatchError, match="output/dense/kernel"):
        adapters.targets(params, [("**/encoder/layer/*/outptu/dense/kernel", adapters.Bottleneck(4))])
    with pytest.raises(ValueError, match="'kernel' leaf"):
        adapters.targets(params, [("**/output/dense/bias", adapters.Bottleneck(4))])
    with pytest.raises(ValueError, match="activation"):
        adapters.Bottleneck(4, "sigmoidish")
    model = MLP()
    p = model.init(jax.random.key(0), np.zeros((1, 4), np.float32))["params"]
    with_a, spec = adapters.add(p, [("dense_0/kernel", adapters.Bottleneck(2))])
    with pytest.raises(KeyError, match="no adapters named"):
        adapters.wrap(linen_apply(model), spec)({"params": p}, {"x": np.zeros((1, 4))}, train=False)

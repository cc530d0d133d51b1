"""The shared model parts (jaxfer.models.common) and the models -> weights import boundary."""

import ast
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfer.models
from jaxfer import tree
from jaxfer.models import common


def test_activation_table_and_unknown_name():
    x = jnp.array([-2.0, 0.5, 3.0])
    np.testing.assert_allclose(common.activation("relu")(x), [0.0, 0.5, 3.0])
    np.testing.assert_allclose(common.activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown activation 'gelu_fast'.*gelu_new"):
        common.activation("gelu_fast")


def test_config_dict_fills_missing_and_none_from_defaults():
    class HF:  # a PretrainedConfig-like object
        def to_dict(self):
            return {"hidden_size": 8, "hidden_act": None, "pad_token_id": None}

    defaults = {"hidden_act": "gelu", "layer_norm_eps": 1e-12}
    for cfg in (HF(), HF().to_dict()):
        c = common.config_dict(cfg, defaults)
        assert c == {"hidden_size": 8, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": None}
    src = {"a": 1}
    common.config_dict(src)["a"] = 2
    assert src == {"a": 1}  # a copy


def test_self_attention_matches_the_formula_and_names_its_submodules():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    mask = np.ones((2, 5), np.int32)
    mask[1, 3:] = 0
    bias = common.padding_bias(mask, x.dtype)
    att = common.SelfAttention(num_heads=2, names=("q", "k", "v"))
    params = att.init(jax.random.key(1), x, bias)["params"]
    assert set(params) == {"q", "k", "v"}
    out = att.apply({"params": params}, x, bias)

    def heads(name):
        y = x @ params[name]["kernel"] + params[name]["bias"]
        return y.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)  # (B, heads, T, d)

    q, k, v = heads("q"), heads("k"), heads("v")
    scores = q @ k.transpose(0, 1, 3, 2) / 2.0 + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    want = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(2, 5, 8)
    np.testing.assert_allclose(out, want, atol=1e-5)
    # padded keys get no weight: changing x at padded positions leaves row 1's real tokens alone
    x2 = x.at[1, 3:].set(100.0)
    np.testing.assert_allclose(att.apply({"params": params}, x2, bias)[1, :3], out[1, :3], atol=1e-5)


def test_layer_stack_scopes_and_states():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            return common.LayerStack(lambda i, name: nn.Dense(3 + i, name=name), 3, name="layer")(x)

    x = jnp.ones((1, 2))
    v = Stack().init(jax.random.key(0), x)
    assert sorted(tree.paths(v["params"])) == [f"layer/{i}/{p}" for i in range(3) for p in ("bias", "kernel")]
    states = Stack().apply(v, x)
    assert [s.shape for s in states] == [(1, 2), (1, 3), (1, 4), (1, 5)]


def test_torch_conv_pads_symmetrically_like_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(1, 3, 9, 8)).astype(np.float32)  # odd/even edges
    ref = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    conv = common.torch_conv(4, 3, 2, name="c")
    kernel = np.transpose(ref.weight.detach().numpy(), (2, 3, 1, 0))
    ours = common.to_nchw(conv.apply({"params": {"kernel": kernel}}, common.to_nhwc(x)))
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours, want, atol=1e-5)
    pooled = common.to_nchw(common.torch_max_pool(common.to_nhwc(x), 3, 2, 1))
    np.testing.assert_allclose(pooled, torch.nn.functional.max_pool2d(torch.tensor(x), 3, 2, 1).numpy())


@pytest.mark.parametrize("size", [(9, 8), (5, 3), (14, 14)])
def test_pools_match_torch(size):
    """Adaptive average pooling (bins that overlap, or repeat an input when the map is
    smaller than the output) and average pooling with/without counting the padding."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(1).normal(size=(2, 3, *size)).astype(np.float32)
    t, nhwc = torch.tensor(x), common.to_nhwc(x)
    ours = common.to_nchw(common.adaptive_avg_pool(nhwc, 7))
    np.testing.assert_allclose(ours, F.adaptive_avg_pool2d(t, 7).numpy(), atol=1e-6)
    for include in (True, False):
        ours = common.to_nchw(common.torch_avg_pool(nhwc, 3, 1, 1, count_include_pad=include))
        np.testing.assert_allclose(ours, F.avg_pool2d(t, 3, 1, 1, count_include_pad=include).numpy(), atol=1e-6)
    # Keras/TF "same" average pooling = torch's with the padding left out of the count (stride 1)
    np.testing.assert_allclose(common.same_avg_pool(nhwc, 3), common.torch_avg_pool(nhwc, 3, 1, 1,
                               count_include_pad=False), atol=1e-6)


def test_same_conv_pads_like_tensorflow():
    """TF "SAME", stride 2 on an even size: no padding before, one row/column after."""
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    conv = common.same_conv(1, 3, 2, name="c")
    y = conv.apply({"params": {"kernel": jnp.ones((3, 3, 1, 1))}}, x)
    assert y.shape == (1, 2, 2, 1)
    assert float(y[0, 0, 0, 0]) == float(x[0, :3, :3].sum())  # window rows/cols 0-2: nothing padded before
    assert float(y[0, 1, 1, 0]) == float(x[0, 2:, 2:].sum())   # rows/cols 2-3 + one padded


@pytest.mark.parametrize("height, width, kernel, stride, bias", [(7, 7, 3, 1, False), (8, 8, 3, 2, True),
                                                                 (9, 6, 5, 2, False), (10, 10, 5, 1, True)])
def test_depthwise_conv_is_the_grouped_conv(height, width, kernel, stride, bias):
    """Same parameters (so key maps load either), same outputs and gradients as flax's
    grouped ``nn.Conv`` with TF "SAME" padding, odd and even sizes, stride 1 and 2."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, height, width, 6)), jnp.float32)
    grouped = nn.Conv(6, (kernel, kernel), strides=stride, padding="SAME", feature_group_count=6, use_bias=bias)
    ours = common.same_conv(6, kernel, stride, groups=6, use_bias=bias, name="c")
    assert isinstance(ours, common.DepthwiseConv)
    variables = grouped.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
    if bias:
        variables = jax.tree.map(lambda v: v + 0.3, variables)
    np.testing.assert_allclose(ours.apply(variables, x), grouped.apply(variables, x), atol=1e-5)

    def grads(module):
        return jax.grad(lambda v, x: (module.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(grouped))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="got 6 input channels"):
        common.DepthwiseConv(8, (3, 3)).init(jax.random.key(0), x)


def test_drop_path_drops_whole_examples_and_rescales():
    x = jnp.ones((1000, 2, 2, 3))
    y = common.drop_path(x, 0.25, deterministic=False, rng=jax.random.key(0))
    per_example = np.asarray(y).reshape(1000, -1)
    assert set(np.unique(per_example)) <= {np.float32(0.0), np.float32(1 / 0.75)}
    assert (per_example.min(1) == per_example.max(1)).all()  # all or nothing per example
    assert 0.2 < (per_example[:, 0] == 0).mean() < 0.3
    assert common.drop_path(x, 0.25, deterministic=True) is x


class _Residual(nn.Module):
    """A frozen-able residual block with stochastic depth, as EfficientNet's MBConv has."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return x + common.DropPath(0.5, name="drop_path")(nn.Dense(3, name="dense")(x), deterministic=not train)


def test_drop_path_module_is_dropout_so_a_frozen_block_runs_it_as_the_identity():
    from jaxfer.train.step import frozen_inference_scope, linen_apply, module_status

    block = _Residual()
    x = jnp.ones((64, 3))
    variables = block.init(jax.random.key(0), x)
    apply_fn = linen_apply(block)
    assert isinstance(common.DropPath(0.5), nn.Dropout)
    evaluated, _ = apply_fn(variables, {"x": x}, train=False)
    trained, _ = apply_fn(variables, {"x": x}, train=True, rng=jax.random.key(1))
    assert not np.allclose(trained["logits"], evaluated["logits"])  # trainable: examples dropped in training
    frozen = module_status({"dense": {"kernel": False, "bias": False}})
    with frozen_inference_scope(frozen):
        frozen_trained, _ = apply_fn(variables, {"x": x}, train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(frozen_trained["logits"], evaluated["logits"])


def test_models_never_import_weights():
    """``jaxfer.models`` sits below ``jaxfer.weights``: weights import models, never back."""
    root = pathlib.Path(jaxfer.models.__file__).parent
    offenders = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{f.name}:{node.lineno} {n}" for n in names
                          if n == "jaxfer.weights" or n.startswith("jaxfer.weights.") or n == "jaxfer.load"]
    assert len(list(root.glob("*.py"))) >= 6  # the scan sees the family files
    assert offenders == []

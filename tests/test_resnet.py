"""ResNet parity against transformers (torch) on tiny random checkpoints whose batch-norm
running statistics were moved away from (0, 1) by a few training-mode passes."""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import tree  # noqa: E402
from jaxfer.models import heads, registry, resnet  # noqa: E402
from jaxfer.models.keymap import apply_key_map, generic_rules, strip_prefix  # noqa: E402
from tests.parity import TOL, assert_same_layout, maxdiff, numpy_state_dict, variables  # noqa: E402
from tests.parity import torch_out as _torch_out  # noqa: E402

LAYER_TYPES = ["basic", "bottleneck"]


def tiny_config(layer_type, **kw):
    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type=layer_type,
                                     num_labels=3, **kw)


def pixels(n=2, h=33, w=30):  # odd sizes: torch and flax padding must agree on every edge
    return np.random.default_rng(0).normal(size=(n, 3, h, w)).astype(np.float32)


def with_running_stats(model, seed=0):
    """A few training-mode passes on shifted inputs, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32, generator=g) * 2 + 0.5)
    return model.eval()


def torch_out(model, x):
    return _torch_out(model, x, output_hidden_states=True)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_backbone_parity(layer_type):
    torch.manual_seed(0)
    ref_model = with_running_stats(transformers.ResNetModel(tiny_config(layer_type)))
    cfg = ref_model.config
    sd = numpy_state_dict(ref_model)
    flat, unused = resnet.convert(sd, cfg)
    assert unused == []
    assert set(flat) == {"params", "batch_stats"}
    # running statistics are non-trivial and land in batch_stats
    var = flat["batch_stats"]["embedder/embedder/normalization/var"]
    np.testing.assert_array_equal(var, sd["embedder.embedder.normalization.running_var"])
    assert np.abs(var - 1).max() > 0.1
    module = resnet.build(cfg)
    assert_same_layout(module, resnet.dummy_inputs(cfg), flat)
    assert "encoder/stages/1/layers/0/shortcut/convolution/kernel" in flat["params"]

    x = pixels()
    out = module.apply(variables(flat), x, output_hidden_states=True)
    ref = torch_out(ref_model, x)
    d_last = maxdiff(out["last_hidden_state"], ref.last_hidden_state)
    d_pool = maxdiff(out["pooler_output"], ref.pooler_output)
    print(f"ResNet {layer_type} parity: last_hidden_state {d_last:.2e}, pooler_output {d_pool:.2e}")
    assert d_last <= TOL and d_pool <= TOL
    assert out["pooler_output"].shape == (2, 16, 1, 1)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
        assert maxdiff(ours, theirs) <= TOL


@pytest.mark.parametrize("options", [dict(downsample_in_first_stage=True), dict(downsample_in_bottleneck=True)])
def test_downsampling_options(options):
    torch.manual_seed(3)
    ref_model = with_running_stats(transformers.ResNetModel(tiny_config("bottleneck", **options)))
    flat, unused = resnet.convert(numpy_state_dict(ref_model), ref_model.config)
    assert unused == []
    x = pixels()
    out = resnet.build(ref_model.config).apply(variables(flat), x)
    assert maxdiff(out["last_hidden_state"], torch_out(ref_model, x).last_hidden_state) <= TOL


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_classification_logits_parity(layer_type):
    torch.manual_seed(1)
    ref_model = with_running_stats(transformers.ResNetForImageClassification(tiny_config(layer_type)))
    inner, rest = strip_prefix(numpy_state_dict(ref_model), "resnet")
    backbone, unused = resnet.convert(inner, ref_model.config)
    head, head_unused = apply_key_map(generic_rules(), rest)  # classifier.1.* (Sequential(Flatten, Linear))
    assert unused == head_unused == []
    model = heads.TaskModel(resnet.build(ref_model.config), heads.Classifier(3, pooling="pooler", dense_name="1"),
                            prefix="resnet")
    v = {"params": {"resnet": tree.unflatten(backbone["params"]), **tree.unflatten(head["params"])},
         "batch_stats": {"resnet": tree.unflatten(backbone["batch_stats"])}}
    x = pixels()
    d = maxdiff(model.apply(v, x)["logits"], torch_out(ref_model, x).logits)
    print(f"ResNet {layer_type} classification logits parity: {d:.2e}")
    assert d <= TOL


def test_train_mode_uses_batch_statistics_and_updates_running_mean():
    torch.manual_seed(4)
    ref_model = with_running_stats(transformers.ResNetModel(tiny_config("basic")))
    flat, _ = resnet.convert(numpy_state_dict(ref_model), ref_model.config)
    x = pixels(n=4)
    out, updated = resnet.build(ref_model.config).apply(variables(flat), x, train=True, mutable=["batch_stats"])
    ref_model.train()
    ref = torch_out(ref_model, x)
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state) <= TOL
    new = tree.flatten(updated["batch_stats"])
    flat_new, _ = resnet.convert(numpy_state_dict(ref_model), ref_model.config)
    for path, want in flat_new["batch_stats"].items():
        assert not np.allclose(new[path], flat["batch_stats"][path]), path  # it moved
        if path.endswith("/mean"):  # the variance differs by torch's unbiased n/(n-1) (see resnet.py)
            np.testing.assert_allclose(new[path], want, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_allclose(new[path], want, rtol=0.05, err_msg=path)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_load_end_to_end(tmp_path, layer_type):
    torch.manual_seed(2)
    ref_model = with_running_stats(transformers.ResNetForImageClassification(tiny_config(layer_type)))
    ref_model.save_pretrained(tmp_path)
    x = pixels()
    ref = torch_out(ref_model, x)

    model = jw.load(tmp_path, head=heads.Classifier(3, dense_name="1"))  # pooling from the family: "pooler"
    assert set(model.params) == {"resnet", "classifier"} and set(model.state) == {"batch_stats"}
    assert {"classifier/1/kernel", "classifier/1/bias"} <= set(model.report.loaded)
    assert "resnet/embedder/embedder/normalization/mean [batch_stats]" in model.report.loaded
    assert not model.report.reinitialized and not model.report.initialized
    d_logits = maxdiff(model.apply(None, x)["logits"], ref.logits)
    print(f"ResNet {layer_type} load() logits parity: {d_logits:.2e}")
    assert d_logits <= TOL

    backbone = jw.load(tmp_path)  # backbone only: head keys dropped, running stats kept
    out = backbone.apply(None, x)
    assert maxdiff(out["last_hidden_state"], ref.hidden_states[-1]) <= TOL


def test_family_registration():
    fam = registry.get("resnet")
    assert fam.base_model_prefix == "resnet" and fam.default_pooling == "pooler"
    cfg = tiny_config("basic")
    assert fam.num_layers(cfg) == 2 and fam.num_layers({}) == 4  # HF default: ResNet-50's 4 stages
    module = fam.build(cfg)
    v = module.init(jax.random.key(0), **fam.dummy_inputs(cfg))
    stages = {int(m.group(1)) for p in tree.paths(v["params"]) if (m := re.search(fam.layer_pattern, p))}
    assert stages == {0, 1}
    assert tree.paths(v["batch_stats"])[0].endswith("/mean")


def test_grey_input_through_adapted_stem_matches_rgb():
    """``surgery.adapt_input_channels`` on the stem kernel: a 1-channel image gives what the
    3-channel model gives on the same image repeated (the conv infers channels from the input)."""
    from jaxfer.weights import surgery

    torch.manual_seed(5)
    ref_model = with_running_stats(transformers.ResNetModel(tiny_config("basic")))
    flat, _ = resnet.convert(numpy_state_dict(ref_model), ref_model.config)
    v = variables(flat)
    grey_params, op = surgery.adapt_input_channels(v["params"], "embedder/embedder/convolution/kernel", 1)
    assert tuple(op.after) == (7, 7, 1, 8)
    grey = pixels()[:, :1]
    module = resnet.build(ref_model.config)
    a = module.apply({**v, "params": grey_params}, grey)["pooler_output"]
    b = module.apply(v, np.repeat(grey, 3, axis=1))["pooler_output"]
    np.testing.assert_allclose(a, b, atol=1e-5)

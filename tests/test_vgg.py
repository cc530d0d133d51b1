"""VGG parity on small random weights: torchvision (plain and batch-norm), timm, Keras (.h5),
plus the full-size VGG16/19 torchvision layouts."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jaxfer as jf  # noqa: E402
from jaxfer.models import vgg  # noqa: E402
from tests.parity import TOL, assert_same_layout, maxdiff, numpy_state_dict, torch_out, variables  # noqa: E402

WIDTHS = ((4,), (8,), (8, 8), (16, 16), (16, 16))  # VGG-11's shape, narrow
CFG = [4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16, "M"]


def pixels(n=2, size=64, seed=0):  # 64 px: a 2x2 map before the 7x7 pooling (pixels repeat)
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def with_running_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    return model.eval()


def tiny_torchvision(batch_norm):
    """torchvision's VGG (its forward and names) on narrow features and a small classifier."""
    torch.manual_seed(0)
    model = torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers(CFG, batch_norm=batch_norm),
                                       num_classes=5)
    nn = torch.nn
    model.classifier = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 24),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(24, 5))
    return with_running_stats(model) if batch_norm else model.eval()


def _logits(config, flat, head, x):
    out = vgg.build(config).apply(variables(flat), x)
    return np.asarray(out["pooler_output"]) @ head[0] + head[1], out


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_parity(batch_norm):
    ref = tiny_torchvision(batch_norm)
    config = {"model_type": "vgg", "widths": WIDTHS, "batch_norm": batch_norm, "fc_features": (32, 24)}
    sd = numpy_state_dict(ref)
    flat, unused = vgg.convert(sd, config)
    assert unused == ["classifier.6.weight", "classifier.6.bias"]
    assert_same_layout(vgg.build(config), vgg.dummy_inputs(config), flat)
    x = pixels()
    logits, out = _logits(config, flat, (sd["classifier.6.weight"].T, sd["classifier.6.bias"]), x)
    d = maxdiff(logits, torch_out(ref, x))
    print(f"VGG (torchvision, batch_norm={batch_norm}) logits max abs diff {d:.2e}")
    assert d <= TOL
    # the feature map before the 7x7 pooling, too
    assert maxdiff(out["last_hidden_state"], torch_out(ref.features, x)) <= TOL


def test_timm_parity_and_head_loading(tmp_path):
    """timm's VGG (pre_logits as 7x7 and 1x1 convs) through jf.load from a safetensors file,
    its ImageNet-style head loading into a Classifier of the same size."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.models.vgg.VGG(CFG, num_classes=5, mlp_ratio=32 / 4096).eval()  # fc1: 16 -> 32, fc2: 32 -> 4096
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = {"model_type": "vgg", "widths": WIDTHS, "fc_features": (32, 4096)}
    model = jf.load(str(tmp_path), head=jf.heads.Classifier(5), config=config)
    assert model.report.initialized == [] and not model.report.dropped
    x = pixels(size=48, seed=2)
    logits = jax.jit(lambda p, x: model.apply(p, pixel_values=x)["logits"])(model.params, x)
    d = maxdiff(logits, torch_out(ref, x))
    print(f"VGG (timm) logits max abs diff {d:.2e}")
    assert d <= TOL


def test_keras_h5_parity(tmp_path):
    """A Keras VGG laid out as keras.applications names it (block<b>_conv<k>, fc1, fc2,
    predictions), saved as .h5; Keras's weights read BGR, ours RGB after the load-time flip."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("needs keras on the JAX backend")
    keras.utils.set_random_seed(0)
    inp = keras.Input((224, 224, 3))
    x = inp
    for b, widths in enumerate(WIDTHS):
        for k, w in enumerate(widths):
            x = keras.layers.Conv2D(w, 3, padding="same", activation="relu", name=f"block{b + 1}_conv{k + 1}")(x)
        x = keras.layers.MaxPooling2D(2, 2, name=f"block{b + 1}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(24, activation="relu", name="fc2")(x)
    x = keras.layers.Dense(5, name="predictions")(x)
    ref = keras.Model(inp, x)
    for layer in ref.layers:  # non-zero biases
        if layer.weights:
            layer.set_weights([w if w.ndim > 1 else np.random.default_rng(3).normal(0, 0.1, w.shape)
                               for w in layer.get_weights()])
    ref.save(str(tmp_path / "vgg_keras.h5"))
    config = {"model_type": "vgg", "widths": WIDTHS, "fc_features": (32, 24), "normalization": "caffe"}
    model = jf.load(str(tmp_path / "vgg_keras.h5"), head=jf.heads.Classifier(5), config=config)
    assert model.report.format == "keras" and model.report.initialized == []
    rgb = np.random.default_rng(4).normal(size=(2, 224, 224, 3)).astype(np.float32)
    want = np.asarray(ref(rgb[..., ::-1]))  # Keras's VGG reads BGR
    got = model.apply(None, pixel_values=np.transpose(rgb, (0, 3, 1, 2)))["logits"]
    d = float(np.abs(np.asarray(got) - want).max())
    print(f"VGG (Keras .h5) logits max abs diff {d:.2e}")
    assert d <= TOL
    assert model.preprocessing()["std"] == (1 / 255,) * 3  # caffe: mean-subtracted 0-255 values


@pytest.mark.parametrize("depth, batch_norm", [(16, False), (19, True)])
def test_full_size_torchvision_layouts(depth, batch_norm):
    """The real VGG16 / VGG19-BN convolutional layouts map onto ours (shapes only: built on
    the meta device, weights never allocated)."""
    with torch.device("meta"):
        ref = getattr(torchvision.models, f"vgg{depth}{'_bn' if batch_norm else ''}")()
    sd = {k: np.zeros((1,) * v.ndim, np.float32) for k, v in ref.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = {"model_type": "vgg", "depth": depth, "batch_norm": batch_norm}
    flat, unused = vgg.convert(sd, config)
    assert unused == ["classifier.6.weight", "classifier.6.bias"]
    abstract = jax.eval_shape(lambda: vgg.build(config).init(jax.random.key(0), **vgg.dummy_inputs(config)))
    ours = {p: tuple(v.shape) for p, v in jf.tree.flatten(abstract["params"]).items()}
    assert set(ours) == set(flat["params"])
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 4:
            name = vgg.feature_names(config)[int(key.split(".")[1])].replace(".", "/") + "/kernel"
            assert ours[name] == (shape[2], shape[3], shape[1], shape[0])
    assert ours["fc1/kernel"] == (512 * 49, 4096) and shapes["classifier.0.weight"] == (4096, 512 * 49)
    assert len([p for p in ours if p.endswith("conv/kernel")]) == {16: 13, 19: 16}[depth]

"""Inception-v3 parity on random weights (full width, 107 px: a 2x2 map at the end, so batch-norm
statistics from a few calibration passes are not degenerate):
torchvision (with and without ``transform_input``), timm, and Keras applications' .h5."""

import functools
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jaxfer as jf  # noqa: E402
from jaxfer.models import inception  # noqa: E402
from tests.parity import TOL, assert_same_layout, maxdiff, numpy_state_dict, torch_out, variables  # noqa: E402


def pixels(n=2, size=107, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def with_running_stats(model, seed=0):
    """Running statistics = average batch statistics of two passes; then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    aux, flag = model.AuxLogits, model.aux_logits  # too small an input for it; dropped on load anyway
    model.AuxLogits, model.aux_logits = None, False
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 107, 107, generator=g))
    model.AuxLogits, model.aux_logits = aux, flag
    return model.eval()


@functools.lru_cache(maxsize=None)
def _apply(layout, transform_input):
    module = inception.build({"model_type": "inception_v3", "layout": layout, "transform_input": transform_input})
    return jax.jit(lambda v, x: module.apply(v, x)["pooler_output"].reshape(x.shape[0], -1))


def _logits(flat, head, x, layout="torch", transform_input=False):
    return np.asarray(_apply(layout, transform_input)(variables(flat), x)) @ head[0] + head[1]


@pytest.mark.parametrize("transform_input", [False, True])
def test_torchvision_parity(transform_input):
    torch.manual_seed(0)
    ref = with_running_stats(torchvision.models.Inception3(num_classes=7, aux_logits=True, init_weights=False,
                                                           transform_input=transform_input))
    config = {"model_type": "inception_v3", "transform_input": transform_input}
    sd = numpy_state_dict(ref)
    flat, unused = inception.convert(sd, config)
    assert set(unused) == {"fc.weight", "fc.bias", *[k for k in sd if k.startswith("AuxLogits.")]}
    assert_same_layout(inception.build(config), inception.dummy_inputs(config), flat)
    assert len(inception.unit_paths()) == 94
    x = pixels()
    logits = _logits(flat, (sd["fc.weight"].T, sd["fc.bias"]), x, transform_input=transform_input)
    ref_logits = torch_out(ref, x)
    d = maxdiff(logits, ref_logits)
    print(f"Inception-v3 (torchvision, transform_input={transform_input}) logits max abs diff {d:.2e} "
          f"(max abs logit {ref_logits.abs().max():.2f})")
    assert d <= TOL and ref_logits.abs().max() > 0.1


def test_timm_parity_and_load(tmp_path):
    """timm's inception_v3 state dict through jf.load (.pth): the head loads, AuxLogits is
    reported as another head's keys and dropped."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = with_running_stats(timm.create_model("inception_v3", pretrained=False, num_classes=7, aux_logits=True),
                             seed=1)
    torch.save(ref.state_dict(), tmp_path / "inception_v3.pth")  # AuxLogits.* included
    ref.aux_logits = False  # timm runs it in eval mode too; compare the main logits
    model = jf.load(str(tmp_path / "inception_v3.pth"), head=jf.heads.Classifier(7),
                    config={"model_type": "inception_v3"})
    assert model.report.initialized == []
    assert model.report.dropped and all(k.startswith("AuxLogits/") and v == "another head's keys"
                                        for k, v in model.report.dropped.items())
    x = pixels(seed=3)
    logits = np.asarray(jax.jit(lambda p, x: model.apply(p, pixel_values=x)["logits"])(model.params, x))
    ref_logits = torch_out(ref, x)
    # these weights give logits up to ~7: float32 rounding alone moves torch's own logits by
    # ~3e-4 from its float64 run, so both are held to the float64 reference
    exact = torch_out(ref.double(), x.astype(np.float64)).numpy()
    d, d_torch = float(np.abs(logits - exact).max()), float(np.abs(ref_logits.numpy() - exact).max())
    print(f"Inception-v3 (timm) logits max abs diff from float64: ours {d:.2e}, torch float32 {d_torch:.2e}")
    assert d <= max(TOL, 2 * d_torch) and ref_logits.abs().max() > 0.1


def test_keras_h5_parity(tmp_path):
    """keras.applications.InceptionV3 itself (random weights, non-trivial BN statistics) saved
    as .h5: its 94 conv2d_<n> / batch_normalization_<n> layers map by creation order."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("needs keras on the JAX backend")
    keras.utils.set_random_seed(0)
    ref = keras.applications.InceptionV3(weights=None, include_top=True, input_shape=(107, 107, 3), classes=7,
                                         classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in ref.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # beta, moving mean, moving variance
            beta, mean, var = layer.get_weights()
            layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                               rng.uniform(0.5, 2.0, var.shape)])
    ref.save(str(tmp_path / "inception_v3_keras.h5"))
    config = {"model_type": "inception_v3", "layout": "keras"}
    model = jf.load(str(tmp_path / "inception_v3_keras.h5"), head=jf.heads.Classifier(7), config=config)
    assert model.report.format == "keras" and model.report.initialized == []
    x = rng.normal(size=(2, 107, 107, 3)).astype(np.float32)
    want = np.asarray(ref(x))
    got = np.asarray(jax.jit(lambda p, x: model.apply(p, pixel_values=x)["logits"])(
        model.params, np.transpose(x, (0, 3, 1, 2))))
    d = float(np.abs(got - want).max())
    print(f"Inception-v3 (Keras .h5) logits max abs diff {d:.2e} (max abs logit {np.abs(want).max():.2f})")
    assert d <= TOL
    assert model.preprocessing()["mean"] == (0.5,) * 3  # Keras's inception scaling: [-1, 1]

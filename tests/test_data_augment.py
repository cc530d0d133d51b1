"""Augmentation presets (seeded, resumable), greyscale input, and preprocessing read from the model."""

import json

import numpy as np
import pytest

from jaxfer import data
from jaxfer.data import augment

PIL = pytest.importorskip("PIL.Image")


def _source(n=12, size=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return data.from_arrays({"image": images, "label": np.arange(n) % 2, "id": np.arange(n)})


@pytest.mark.parametrize("preset", sorted(augment.PRESETS))
def test_every_preset_is_a_pure_function_of_the_rng(preset):
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    fn = data.image_transform(16, train=True, augment=preset)
    a = fn({"image": img}, np.random.default_rng([7, 0, 3]))["pixel_values"]
    b = fn({"image": img}, np.random.default_rng([7, 0, 3]))["pixel_values"]
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    if preset != "none":  # something random happens
        outs = {fn({"image": img}, np.random.default_rng(s))["pixel_values"].tobytes() for s in range(6)}
        assert len(outs) > 1
    else:  # "none" trains on the evaluation transform
        np.testing.assert_array_equal(a, data.image_transform(16)({"image": img}, None)["pixel_values"])


def test_augmented_batches_resume_exactly():
    """Seed + step fix every batch: a fresh iterator set to a saved state yields what the
    original yields from there (crop, flips, rotation, jitter and RandAugment included)."""
    src = _source()
    policy = {"preset": "randaugment", "vflip": True, "rotate": 15.0, "brightness": 0.3}

    def make(seed=3):
        return data.make_pipeline(src, global_batch_size=4, train=True, image_size=16, seed=seed,
                                  image_options={"augment": policy}, process_index=0, process_count=1)

    it = make()
    for _ in range(4):  # past an epoch boundary (3 batches per epoch)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["id"], want["id"])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    other = next(make(seed=4))
    assert not np.array_equal(other["pixel_values"], next(make())["pixel_values"])


def test_augment_fields_and_errors():
    a = augment.get({"preset": "inspection", "rotate": 5})
    assert a.vflip and a.rotate == 5 and a.scale == (0.7, 1.0)
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'.*inspection"):
        augment.get("heavy")
    with pytest.raises(ValueError, match=r"unknown augmentation fields \['rotation'\]"):
        augment.get({"rotation": 5})
    with pytest.raises(ValueError, match="brightness"):
        augment.Augment(brightness=1.5)


def test_flips_move_pixels_where_they_should():
    img = np.zeros((8, 8, 3), np.uint8)
    img[0, 0] = 255  # top-left corner
    policy = augment.Augment(crop=False, hflip=True, vflip=True)
    seen = set()
    for s in range(40):
        out = augment.apply(PIL.fromarray(img), policy, np.random.default_rng(s))
        arr = np.asarray(out)[..., 0]
        seen.add(tuple(int(v) for v in np.argwhere(arr == 255)[0]))
    assert seen == {(0, 0), (0, 7), (7, 0), (7, 7)}


def test_greyscale_is_replicated_into_three_equal_channels(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    PIL.fromarray(grey, mode="L").save(tmp_path / "g.png")
    assert data.read_image(str(tmp_path / "g.png")).shape == (20, 20)  # the source keeps one channel
    fn = data.image_transform(20, resize=(20, 20), mean=(0.0,) * 3, std=(1.0,) * 3)
    for image in (grey, grey[..., None], data.read_image(str(tmp_path / "g.png"))):
        x = fn({"image": image}, None)["pixel_values"]
        assert x.shape == (3, 20, 20)
        np.testing.assert_array_equal(x[0], x[1])
        np.testing.assert_array_equal(x[0], x[2])
        np.testing.assert_allclose(x[0], grey / 255.0, atol=1e-6)


def test_transform_options_from_a_model_description():
    effnet = {"size": 224, "crop_pct": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "resample": "bilinear"}
    size, opts = data.transform_options(effnet)
    assert size == 224 and opts["resize"] == 224 and opts["mean"] == effnet["mean"]
    size, opts = data.transform_options(effnet, 160, {"augment": "inspection"})
    assert size == 160 and opts["resize"] == 160 and opts["augment"] == "inspection"
    resnet = dict(effnet, crop_pct=0.875, resample="bicubic")
    assert data.transform_options(resnet, 224)[1]["resize"] == 256
    vit = dict(effnet, size=384, crop_pct=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert data.transform_options(vit)[1]["resize"] == (384, 384)
    assert data.transform_options(vit, 224, {"mean": (0.1,) * 3})[1]["mean"] == (0.1,) * 3  # the recipe wins
    with pytest.raises(ValueError, match="set data.image_size"):
        data.transform_options(None)


@pytest.mark.parametrize("processor, want", [
    ({"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2},
     {"size": 384, "crop_pct": None, "resample": "bilinear", "mean": (0.5,) * 3}),
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
      "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
     {"size": 224, "crop_pct": 0.875, "resample": "bicubic"}),
    ({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
     {"size": 224, "crop_pct": 0.875}),
])
def test_preprocessor_config_json_is_read(tmp_path, processor, want):
    from jaxfer.weights import sources

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    got = sources.read_preprocessing(tmp_path)
    assert {k: got[k] for k in want} == want
    (tmp_path / "empty").mkdir()
    assert sources.read_preprocessing(tmp_path / "empty") is None


def test_a_checkpoints_processor_beats_the_family_default(tmp_path):
    """A ViT folder: the family says mean 0.5; a preprocessor_config.json saying otherwise wins."""
    pytest.importorskip("torch")
    import jaxfer as jf
    from tests import stand_ins

    vit = stand_ins.tiny_vit(str(tmp_path / "vit"))
    assert jf.load(vit).preprocessing() == {"size": 32, "crop_pct": None, "mean": (0.5,) * 3,
                                            "std": (0.5,) * 3, "resample": "bilinear"}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_mean": [0.4] * 3, "image_std": [0.2] * 3}))
    assert jf.load(vit).preprocessing()["mean"] == (0.4,) * 3

import functools

import numpy as np
import pytest

from jaxfer import data

PIL = pytest.importorskip("PIL.Image")


def _write_folder(root, sizes=((40, 30), (30, 50), (33, 33))):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class-dependent channel
            PIL.fromarray(arr).save(root / cls / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_eval_pixel_values(tmp_path):
    _write_folder(tmp_path)
    src = data.read_image_folder(tmp_path)
    assert src.label_names == ("cat", "dog") and len(src) == 6
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    ev = data.make_pipeline(src, global_batch_size=4, train=False, image_size=24,
                            process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 2
    b = batches[0]
    assert b["pixel_values"].shape == (4, 3, 24, 24) and b["pixel_values"].dtype == np.float32
    assert "image" not in b
    assert batches[1]["mask"].tolist() == [1, 1, 0, 0]
    # normalised: cat images have the red channel at 255 -> (1 - 0.485) / 0.229
    np.testing.assert_allclose(b["pixel_values"][0, 0], (1 - 0.485) / 0.229, rtol=1e-5)
    assert -2.2 < b["pixel_values"].min() and b["pixel_values"].max() < 2.7


def test_normalize_matches_formula():
    img = np.full((2, 2, 3), 128, np.uint8)
    out = data.normalize(img, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert out.shape == (3, 2, 2)
    np.testing.assert_allclose(out, (128 / 255 - 0.5) / 0.25, atol=1e-6)


def test_matches_hf_vit_image_processor():
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    proc = proc_cls(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = np.random.default_rng(1).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    ref = proc(images=PIL.fromarray(img), return_tensors="np")["pixel_values"][0]
    ours = data.image_transform(32, resize=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)(
        {"image": img}, np.random.default_rng(0))["pixel_values"]
    assert ours.shape == ref.shape == (3, 32, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_augmentation_deterministic_under_seed_and_differs_across_seeds(tmp_path):
    _write_folder(tmp_path)
    src = data.read_image_folder(tmp_path)

    def first_epoch(seed):
        it = data.make_pipeline(src, global_batch_size=6, train=True, image_size=16, seed=seed,
                                process_index=0, process_count=1, workers=2)
        return next(it)

    a, b, c = first_epoch(1), first_epoch(1), first_epoch(2)
    assert a["pixel_values"].shape == (6, 3, 16, 16)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    np.testing.assert_array_equal(a["id"], b["id"])
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    # the same example gets a different crop in another epoch
    it = data.TrainIterator(src, 6, seed=1, shuffle=False,
                            map_fn=data.image_transform(16, train=True))
    e0, e1 = next(it), next(it)
    np.testing.assert_array_equal(e0["id"], e1["id"])
    assert not np.array_equal(e0["pixel_values"], e1["pixel_values"])


def test_random_resized_crop_box_in_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 80, 2)
        top, left, ch, cw = data.random_resized_crop_box(rng, int(h), int(w))
        assert 0 <= top and 0 <= left and ch >= 1 and cw >= 1
        assert top + ch <= h and left + cw <= w


def test_mixup_is_pure_and_mixes_labels():
    batch = {"pixel_values": np.stack([np.zeros((3, 2, 2)), np.ones((3, 2, 2))]).astype(np.float32),
             "label": np.array([0, 1]), "mask": np.ones(2, np.float32)}
    before = {k: v.copy() for k, v in batch.items()}
    out = data.mixup(batch, np.random.default_rng(3), num_classes=2, alpha=1.0)
    for k in batch:
        np.testing.assert_array_equal(batch[k], before[k])
    assert out["label"].shape == (2, 2) and out["label"].dtype == np.float32
    np.testing.assert_allclose(out["label"].sum(1), 1.0, rtol=1e-6)
    # pixel value of each example equals the weight of class 1 in its soft label
    np.testing.assert_allclose(out["pixel_values"][:, 0, 0, 0], out["label"][:, 1], rtol=1e-6)
    again = data.mixup(batch, np.random.default_rng(3), num_classes=2, alpha=1.0)
    np.testing.assert_array_equal(out["pixel_values"], again["pixel_values"])


def test_mixup_in_training_pipeline_resumes(tmp_path):
    _write_folder(tmp_path)
    src = data.read_image_folder(tmp_path)
    make = functools.partial(data.make_pipeline, src, global_batch_size=2, train=True,
                             image_size=8, mixup_alpha=0.4, num_classes=2, seed=5,
                             process_index=0, process_count=1)
    it = make()
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = make()
    fresh.set_state(state)
    for e in expected:
        got = next(fresh)
        assert got["label"].shape == (2, 2)
        np.testing.assert_array_equal(got["pixel_values"], e["pixel_values"])
        np.testing.assert_array_equal(got["label"], e["label"])

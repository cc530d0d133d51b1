"""tfds end to end, offline, through ``tfds.testing.mock_data`` (no TensorFlow needed:
the pipeline reads through ``tfds.data_source``)."""

import numpy as np
import pytest

from jaxfer import data
from jaxfer.data import tfds_source

tfds = pytest.importorskip("tensorflow_datasets")


def test_cifar10_train_and_eval_batches_normalised():
    with tfds.testing.mock_data(num_examples=20):
        src = data.TfdsSource("cifar10", "train", process_index=0, process_count=1)
        assert len(src) == src.total == 20
        assert src.label_names == tuple(str(i) for i in range(10))
        assert set(src[0]) == {"image", "label"}  # the string "id" feature is dropped
        train = data.make_pipeline(src, global_batch_size=8, train=True, image_size=32,
                                   image_options={"resize": 32}, seed=0,
                                   process_index=0, process_count=1)
        b = next(train)
        assert b["pixel_values"].shape == (8, 3, 32, 32) and b["pixel_values"].dtype == np.float32
        assert b["label"].shape == (8,) and np.all((0 <= b["label"]) & (b["label"] < 10))
        lo = (0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
        hi = (1 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
        pv = b["pixel_values"]
        assert np.all(pv.min(axis=(0, 2, 3)) >= lo - 1e-5) and np.all(pv.max(axis=(0, 2, 3)) <= hi + 1e-5)
        assert pv.std() > 0.5  # random mock pixels, really normalised (not left in [0, 255])

        # eval: the mock images, centre-cropped at full size, are exactly normalize(image)
        ev = data.make_pipeline(src, global_batch_size=8, train=False, image_size=32,
                                image_options={"resize": 32}, process_index=0, process_count=1)
        batches = list(ev)
        assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 20
        np.testing.assert_allclose(batches[0]["pixel_values"][1], data.normalize(src[1]["image"]),
                                   rtol=1e-6)

        state = train.get_state()
        expected = next(train)
        fresh = data.make_pipeline(src, global_batch_size=8, train=True, image_size=32,
                                   image_options={"resize": 32}, seed=0,
                                   process_index=0, process_count=1)
        fresh.set_state(state)
        np.testing.assert_array_equal(next(fresh)["pixel_values"], expected["pixel_values"])


def test_mnist_grayscale_becomes_three_channels():
    with tfds.testing.mock_data(num_examples=5):
        src = data.TfdsSource("mnist", "test", process_index=0, process_count=1)
        assert src[0]["image"].shape == (28, 28, 1)
        b = next(iter(data.make_pipeline(src, global_batch_size=4, train=False, image_size=28,
                                         image_options={"resize": 28},
                                         process_index=0, process_count=1)))
        assert b["pixel_values"].shape == (4, 3, 28, 28)
        raw = b["pixel_values"] * np.array(data.IMAGENET_STD)[:, None, None] \
            + np.array(data.IMAGENET_MEAN)[:, None, None]  # back to [0, 1]
        np.testing.assert_allclose(raw[:, 0], raw[:, 1], atol=1e-5)  # grey copied to R, G, B
        np.testing.assert_allclose(raw[0, 0] * 255, src[0]["image"][..., 0], atol=1e-3)


def test_each_process_reads_its_even_split(monkeypatch):
    requested = []
    real = tfds.data_source

    def spy(name, *, split, **kw):
        requested.append(split)
        return real(name, split=split, **kw)

    with tfds.testing.mock_data(num_examples=6):
        monkeypatch.setattr(tfds, "data_source", spy)
        src = data.TfdsSource("mnist", "train", process_index=1, process_count=2)
    assert requested[0] == tfds.even_splits("train", n=2)[1]
    assert src.process_index == 1 and src.total == 6
    with pytest.raises(ValueError, match="sharded for process 1/2"):
        data.pipeline(src, global_batch_size=2, train=True, process_index=0, process_count=2)


def test_clear_error_when_tensorflow_is_needed(monkeypatch):
    def fail(*a, **k):
        raise NotImplementedError("dataset is in tfrecord format")

    monkeypatch.setattr(tfds, "data_source", fail)
    monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'jaxfer\[tfds\]'"):
        data.TfdsSource("mnist", "train", process_index=0, process_count=1)

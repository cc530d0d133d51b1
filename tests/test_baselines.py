"""The no-transfer baselines every report shows, and the plain warning when a model does not beat one."""

import numpy as np
from PIL import Image

import jaxfer as jf
from jaxfer import baselines
from tests import stand_ins


def test_text_baseline_learns_the_words_and_the_verdict(tmp_path):
    src = jf.data.read_csv(stand_ins.tweets_csv(str(tmp_path / "t.csv")), text="text", label="sentiment")
    train, test = jf.data.split_source(src, (0.7, 0.3), seed=0)
    report = baselines.non_transfer("text", train, test, num_classes=3, label_names=src.label_names)
    assert report["accuracy"] > 0.8 and report["num_examples"] == len(test)
    assert report["name"] == "TF-IDF + logistic regression"
    worse = {"accuracy": 0.5, "macro_f1": 0.4}
    assert "does not beat the TF-IDF + logistic regression baseline" in baselines.verdict(worse, report)
    assert ":scratch" in baselines.verdict(worse, report)
    assert baselines.verdict({"accuracy": 0.9, "macro_f1": 0.9}, {**report, "macro_f1": 0.8}) is None
    assert "skipped" in baselines.non_transfer("audio", train, test, num_classes=3)


def test_image_baseline_on_pixels(tmp_path):
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 200)):
        (tmp_path / name).mkdir()
        for i in range(12):
            pixels = np.clip(level + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    src = jf.data.read_image_folder(str(tmp_path))
    train, test = jf.data.split_source(src, (0.5, 0.5), seed=0)
    report = baselines.non_transfer("image", train, test, num_classes=2, label_names=src.label_names)
    assert report["accuracy"] == 1.0 and report["name"] == "logistic regression on 32x32 pixels"

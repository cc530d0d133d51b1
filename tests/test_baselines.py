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


def test_task_baselines_fit_each_task_on_its_own_labelled_rows():
    from jaxfer import tasks

    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine"]
    texts = np.array([" ".join(rng.choice(["the", "a", "day", "is"], 3)) + f" {words[i % 3]} {words[i % 3]}"
                      for i in range(90)], object)
    cls = np.array([i % 3 for i in range(90)], np.int64)
    cls[::10] = -100  # no label for this task on these rows
    reg = np.array([float(i % 3) + rng.normal(0, 0.1) for i in range(90)], np.float32)
    reg[1::7] = np.nan
    train = jf.data.from_arrays({"text": texts[:60], "cls": cls[:60], "reg": reg[:60]})
    test = jf.data.from_arrays({"text": texts[60:], "cls": cls[60:], "reg": reg[60:]})
    rows = (tasks.Task("cls", "classification", 3), tasks.Task("reg", "regression", 1),
            tasks.Task("tags", "multi_label", 2))
    out = baselines.task_baselines(rows, train, test)
    assert out["cls"]["accuracy"] == 1.0 and out["cls"]["num_examples"] == int((cls[60:] >= 0).sum())
    assert out["reg"]["r2"] > 0.9 and out["reg"]["num_examples"] == int(np.isfinite(reg[60:]).sum())
    assert "skipped" in out["tags"]
    # the verdict compares R^2 for regression
    assert "R^2 0.1000 vs" in baselines.verdict({"r2": 0.1, "rmse": 1.0}, out["reg"], what="the head")
    assert baselines.verdict({"r2": 0.999, "rmse": 0.0}, out["reg"]) is None

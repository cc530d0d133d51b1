"""Predict on files from a trained workdir: text CSVs and image folders/lists in, a CSV out
whose accuracy against the held-back labels equals `jaxfer eval`'s; the same through a
StableHLO export of the run."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxfer import cli, config as config_lib, experiment
from jaxfer.inference import Predictor
from jaxfer.predict_files import list_images
from tests import stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.train.steps=6", "--config.train.eval_every=3", "--config.train.checkpoint_every=3",
         "--config.optim.warmup_steps=1", "--no_progress"]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _test_split(config_args):
    """The recipe's own test split (what `jaxfer eval` scores), from the same overrides."""
    _, overrides = config_lib.split_overrides([a for a in config_args if a.startswith("--config.")])
    cfg = config_lib.load_with_overrides(config_args[1], overrides)
    return experiment._sources(cfg)[2]


def _eval_accuracy(args, capsys):
    capsys.readouterr()
    assert cli.main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


def test_text_predict_on_a_csv_without_labels_matches_eval(tmp_path, capsys):
    bert = stand_ins.tiny_bert(str(tmp_path / "bert"))
    data = stand_ins.tweets_csv(str(tmp_path / "tweets.csv"))
    run = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs", "minilm_tweets.py:top2"), f"--config.model.source={bert}",
            f"--config.data.path={data}", "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
            "--config.data.max_eval_examples=0", "--config.optim.lr=3e-2",
            "--config.model.pooling=pooler",  # the head HF's BertForSequenceClassification has
            "--workdir", str(run)]
    assert cli.main(["train", *args, *SHORT]) == 0
    # train time saved what prediction needs besides the checkpoint
    spec = json.load(open(run / "inference" / "inference.json"))
    assert spec["label_names"] == ["negative", "neutral", "positive"]
    assert spec["preprocessing"] == {"kind": "text", "max_length": 48, "text": "text"}
    assert os.path.exists(run / "inference" / "tokenizer.json")

    test = _test_split(args)
    names = test.label_names or ("negative", "neutral", "positive")
    unlabeled = tmp_path / "new_tweets.csv"
    with open(unlabeled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "source"])  # no label column; other columns are ignored
        w.writerows([t, "web"] for t in test.columns["text"])
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", *args, "--input", str(unlabeled), "--output", str(out), "--no_progress"]) == 0
    rows = _read(out)
    assert list(rows[0]) == ["text", "label", "prob:negative", "prob:neutral", "prob:positive"]
    assert [r["text"] for r in rows] == list(test.columns["text"])
    probs = np.array([[float(r[f"prob:{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(1)]
    held = [names[i] for i in test.columns["label"]]
    accuracy = float(np.mean([r["label"] == h for r, h in zip(rows, held)]))
    eval_accuracy = _eval_accuracy(args, capsys)
    print(f"predict CSV accuracy {accuracy:.4f} vs jaxfer eval {eval_accuracy:.4f} on {len(rows)} tweets")
    assert accuracy == pytest.approx(eval_accuracy, abs=1e-12)

    # the same run exported: the export (tokenizer inside) predicts the same probabilities
    assert cli.main(["export", *args, "--output", str(tmp_path / "export")]) == 0
    exported = Predictor.from_export(tmp_path / "export")
    assert exported.label_names == tuple(names)
    np.testing.assert_allclose(exported(list(test.columns["text"]))["probs"], probs, atol=2e-6)

    # ... and saved in the Hugging Face layout: PyTorch gives the same probabilities
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert cli.main(["export", *args, "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert [ref.config.id2label[i] for i in range(3)] == list(names)
    enc = tok(list(test.columns["text"]), padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.softmax(ref(**enc).logits, -1).numpy()
    np.testing.assert_allclose(theirs, probs, atol=1e-4)


def _image_folder(root, n_per_class=12, seed=0):
    """Darker and lighter noisy squares: a tiny ViT learns them in a few steps, not perfectly."""
    rng = np.random.default_rng(seed)
    for name, level in (("dark", 105), ("light", 150)):
        os.makedirs(root / name)
        for i in range(n_per_class):
            px = np.clip(level + rng.normal(0, 60, (36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i:02d}.png")
    return root


IMAGE_RECIPE = f"""
import importlib.util

def get_config(arg="full"):
    spec = importlib.util.spec_from_file_location("vit_cifar10", {os.path.join(ROOT, "configs", "vit_cifar10.py")!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)  # the ViT recipe on an image folder
    c.data.kind = "image_folder"
    c.data.path = ""
    c.data.splits = (0.5, 0.25, 0.25)
    return c
"""


def test_image_predict_on_a_folder_and_a_list_matches_eval(tmp_path, capsys):
    vit = stand_ins.tiny_vit(str(tmp_path / "vit"))
    images = _image_folder(tmp_path / "images")
    (tmp_path / "vit_folder.py").write_text(IMAGE_RECIPE)
    run = tmp_path / "run"
    args = ["--config", str(tmp_path / "vit_folder.py"), f"--config.model.source={vit}",
            "--config.model.num_classes=2", f"--config.data.path={images}", "--config.data.image_size=32",
            "--config.data.batch_size=4", "--config.data.eval_batch_size=4", "--workdir", str(run)]
    assert cli.main(["train", *args, *SHORT]) == 0
    spec = json.load(open(run / "inference" / "inference.json"))
    assert spec["label_names"] == ["dark", "light"] and spec["preprocessing"]["kind"] == "image"

    test = _test_split(args)
    held = {p: test.label_names[y] for p, y in zip(test.paths, test.labels)}
    # the test images, unlabelled: copied flat into a new folder, and listed in a .txt file
    flat = tmp_path / "new_images"
    os.makedirs(flat)
    for p in held:
        Image.open(p).save(flat / f"{os.path.basename(os.path.dirname(p))}_{os.path.basename(p)}")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.relpath(p, tmp_path) for p in held) + "\n")
    assert len(list_images([str(listing)])) == len(held)

    eval_accuracy = _eval_accuracy(args, capsys)
    for source in (flat, listing):
        out = tmp_path / f"predictions_{source.name}.csv"
        assert cli.main(["predict", *args, "--input", str(source), "--output", str(out), "--no_progress"]) == 0
        rows = _read(out)
        assert list(rows[0]) == ["path", "label", "prob:dark", "prob:light"] and len(rows) == len(held)
        truth = ([os.path.basename(r["path"]).split("_")[0] for r in rows] if source == flat
                 else [held[os.path.normpath(r["path"])] for r in rows])
        accuracy = float(np.mean([r["label"] == t for r, t in zip(rows, truth)]))
        print(f"{source.name}: predict accuracy {accuracy:.4f} vs jaxfer eval {eval_accuracy:.4f}")
        assert accuracy == pytest.approx(eval_accuracy, abs=1e-12)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a folder, a .txt list"):
        list_images([str(tmp_path / "x.csv")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_images([str(tmp_path / "empty")])
    (tmp_path / "l.txt").write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        list_images([str(tmp_path / "l.txt")])


def test_an_adapter_run_predicts_and_exports_through_its_adapters(tmp_path, capsys):
    """Adapters are not linear: prediction and export run the wrapped apply_fn (not the plain
    model, which would ignore params["adapters"] silently); HF export is refused."""
    bert = stand_ins.tiny_bert(str(tmp_path / "bert"), num_layers=2)
    data = stand_ins.tweets_csv(str(tmp_path / "tweets.csv"))
    run = tmp_path / "run"
    args = ["--config", os.path.join(ROOT, "configs", "minilm_tweets.py:top2"), f"--config.model.source={bert}",
            f"--config.data.path={data}", "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
            "--config.data.max_eval_examples=0", "--config.optim.lr=3e-2", "--config.transfer.adapters.size=4",
            "--config.rules=(('adapters/**', 1.0), ('classifier/**', 1.0), ('**', None))", "--workdir", str(run)]
    assert cli.main(["train", *args, *SHORT]) == 0
    test = _test_split(args)
    names = ("negative", "neutral", "positive")
    unlabeled = tmp_path / "new.jsonl"
    unlabeled.write_text("".join(json.dumps({"text": t}) + "\n" for t in test.columns["text"]))
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", *args, "--input", str(unlabeled), "--output", str(out), "--no_progress"]) == 0
    rows = _read(out)
    held = [names[i] for i in test.columns["label"]]
    accuracy = float(np.mean([r["label"] == h for r, h in zip(rows, held)]))
    eval_accuracy = _eval_accuracy(args, capsys)
    print(f"adapters: predict accuracy {accuracy:.4f} vs jaxfer eval {eval_accuracy:.4f}")
    assert accuracy == pytest.approx(eval_accuracy, abs=1e-12)
    probs = np.array([[float(r[f"prob:{n}"]) for n in names] for r in rows])
    assert cli.main(["export", *args, "--output", str(tmp_path / "export")]) == 0
    np.testing.assert_allclose(Predictor.from_export(tmp_path / "export")(list(test.columns["text"]))["probs"],
                               probs, atol=2e-6)
    with pytest.raises(SystemExit, match="adapters add modules"):
        cli.main(["export", *args, "--format", "hf", "--output", str(tmp_path / "hf")])

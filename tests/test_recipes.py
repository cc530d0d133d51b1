"""Every recipe in configs/ runs a few steps through the CLI, on stand-ins.

The real weights and data are swapped for tiny ones by ``--config.*``
overrides (the same mechanism users have), so no recipe rots unnoticed:
text recipes get a tiny BERT (with the real MiniLM tokenizer) and a small CSV,
tfds recipes get ``tfds.testing.mock_data`` and a tiny ViT.
"""

import csv
import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxfer import cli
from tests import stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "minilm_tweets.py": ("full", "top2", "probe", "lora", "bitfit", "l2sp", "lpft", "unfreeze", "scratch",
                         "fast"),
    "vit_cifar10.py": ("full", "probe", "pod"),  # :scratch is :full with reinit ** (minilm :scratch runs it)
    # trained from scratch at their tiny sizes in tests/test_text_to_text.py ("pretrained" needs the hub)
    "t5_tweets.py": ("tiny", "tiny_classifier"),
    "gpt2_tweets.py": ("tiny", "lm"),
    # on espeak-ng's speech at the tiny sizes in tests/test_speech.py (and colabs/speech_transfer.ipynb)
    "wav2vec2_digits.py": ("tiny", "tiny_then"),
    # trained here: :probe and :top; :full and :scratch (every parameter trained) are built
    # and checked in test_effnet_elpv_full_and_scratch (a full backward compile each is slow)
    "effnet_elpv.py": ("probe", "top"),
}


def test_every_recipe_is_smoke_tested():
    found = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert found == set(RECIPES), "add new recipes to RECIPES in tests/test_recipes.py"


@pytest.fixture(scope="module")
def text_stand_ins(tmp_path_factory):
    d = tmp_path_factory.mktemp("stand_ins")
    return stand_ins.tiny_bert(str(d / "bert")), stand_ins.tweets_csv(str(d / "tweets.csv"))


SHORT = ["--config.train.steps=4", "--config.train.epochs=0", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1", "--config.optim.warmup_steps=1", "--no_progress"]


def _text_args(variant, text_stand_ins, workdir):
    bert, csv = text_stand_ins
    return ["--config", os.path.join(ROOT, "configs", f"minilm_tweets.py:{variant}"),
            f"--config.model.source={bert}", f"--config.data.path={csv}",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
            "--config.data.max_eval_examples=0", "--workdir", str(workdir)]


@pytest.mark.parametrize("variant", RECIPES["minilm_tweets.py"])
def test_minilm_tweets(variant, text_stand_ins, tmp_path, capsys):
    args = _text_args(variant, text_stand_ins, tmp_path / "run")
    extra = ["--config.transfer.unfreeze_every=2"] if variant == "unfreeze" else []  # 2 phases in 4 steps
    assert cli.main(["train", *args, *SHORT, *extra]) == 0
    out = capsys.readouterr().out
    assert "majority-class baseline" in out and "no-transfer baseline:    accuracy" in out
    assert {"full": "cached frozen prefix: not used (layer 0", "top2": "cached frozen prefix: layers 0-3 of 6",
            "probe": "probe: lbfgs on cached features", "lpft": "fine-tuning starts from it (LP-FT)",
            "unfreeze": "cached frozen prefix: not used", "lora": "cached frozen prefix: not used (layer 0",
            "bitfit": "cached frozen prefix: not used", "l2sp": "cached frozen prefix: not used",
            "scratch": "cached frozen prefix: not used", "fast": "cached frozen prefix: layers 0-3 of 6"}[variant] in out
    result = json.load(open(tmp_path / "run" / "test_metrics.json"))
    # every test example counted once: 10% of 192 de-duplicated rows
    support = sum(c["support"] for c in result["test"]["per_class"].values())
    assert support == result["test"]["num_examples"] == 20
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("loss" in r for r in records)
    if variant == "unfreeze":
        assert sorted({r["phase"] for r in records if r["split"] == "train"}) == [0.0, 1.0]
    assert os.path.exists(tmp_path / "run" / "curves.png")
    if variant in ("top2", "lora"):  # the other commands on the same run (lora: merged for predict)
        assert cli.main(["inspect", *args]) == 0
        table = capsys.readouterr().out
        assert "bert/encoder/layer/4" in table and "trainable" in table.lower()
        assert cli.main(["eval", *args]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(
            result["test"]["accuracy"])
        assert cli.main(["predict", *args, "--text", "I love this, great day"]) == 0
        row = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert row["label"] in ("negative", "neutral", "positive")


def test_minilm_tweets_multitask(text_stand_ins, tmp_path, capsys):
    args = _text_args("multitask", text_stand_ins, tmp_path / "run")
    assert cli.main(["train", *args, *SHORT]) == 0
    out = capsys.readouterr().out
    assert "[sentiment]" in out and "[confidence]" in out
    # each head beside its own baseline from nothing, on the rows that have its label
    assert "no-transfer baseline [sentiment]: accuracy" in out and "TF-IDF + logistic regression" in out
    assert "no-transfer baseline [confidence]: R^2" in out and "TF-IDF + ridge regression" in out
    saved = json.load(open(tmp_path / "run" / "test_metrics.json"))
    assert saved["baseline"]["tasks"]["sentiment"]["num_examples"] == 20
    test = saved["test"]
    assert test["sentiment/num_examples"] == test["confidence/num_examples"] == 20
    assert set(test["tasks"]["sentiment"]["per_class"]) == {"negative", "neutral", "positive"}
    evals = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("confidence/r2" in r for r in evals if r["split"] == "eval")
    assert cli.main(["eval", *args]) == 0
    assert json.loads(capsys.readouterr().out)["sentiment/accuracy"] == pytest.approx(test["sentiment/accuracy"])


def test_domain_adaptation_through_a_recipe(text_stand_ins, tmp_path, capsys):
    import ml_collections

    from jaxfer import config as config_lib, experiment

    bert, csv = text_stand_ins
    target = stand_ins.tweets_csv(str(tmp_path / "target.csv"), seed=1)
    _, overrides = config_lib.split_overrides(_text_args("top2", text_stand_ins, "")[2:-2] + SHORT[:-1])
    cfg = config_lib.load_with_overrides(os.path.join(ROOT, "configs", "minilm_tweets.py:top2"), overrides)
    with cfg.unlocked():  # source-only would be method "none": the same run on source batches alone
        cfg.adapt = ml_collections.ConfigDict({"method": "dann", "weight": 1.0, "target": {"path": target}})
    result = experiment.train(cfg, str(tmp_path / "dann"), progress=False)
    assert "source-domain test" in capsys.readouterr().out
    # tested on the target domain's test split (19 de-duplicated rows), reported beside the source's (20)
    assert result["test"]["num_examples"] == 19 and result["source_test"]["num_examples"] == 20
    records = [json.loads(line) for line in open(tmp_path / "dann" / "metrics.jsonl")]
    assert all(r["examples"] == 16 for r in records if r["split"] == "train")  # 8 source + 8 target rows


def test_pmap_strategy_trains_checkpoints_and_resumes(text_stand_ins, tmp_path, capsys):
    """The pmap path end to end: replicated state, one-copy checkpoints, resume, eval."""
    args = _text_args("probe", text_stand_ins, tmp_path / "run") + ["--config.mesh.strategy=pmap",
                                                                     "--config.transfer.probe="]
    assert cli.main(["train", *args, *SHORT[1:], "--config.train.steps=2"]) == 0
    assert cli.main(["train", *args, *SHORT]) == 0  # resumes at step 2, runs to 4
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert sorted(r["step"] for r in records if r["split"] == "train") == [1, 2, 3, 4]
    result = json.load(open(tmp_path / "run" / "test_metrics.json"))
    assert result["steps"] == 4
    capsys.readouterr()
    assert cli.main(["eval", *args]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_unknown_config_key_is_an_error_naming_it(text_stand_ins, tmp_path):
    args = _text_args("full", text_stand_ins, tmp_path / "run")
    with pytest.raises(SystemExit, match="optim.learning_rate"):
        cli.main(["train", *args, "--config.optim.learning_rate=1e-3"])


def test_rule_matching_nothing_stops_before_training_with_nearest_paths(text_stand_ins, tmp_path):
    args = _text_args("top2", text_stand_ins, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"(?s)layer/9/\*\*.*matches no parameter path.*bert/encoder/layer/5"):
        cli.main(["train", *args, "--config.rules=(('bert/encoder/layer/9/**', 1.0), ('**', None))"])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("variant", RECIPES["vit_cifar10.py"])
def test_vit_cifar10_on_mock_tfds(variant, tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    vit = stand_ins.tiny_vit(str(tmp_path / "vit"))
    args = ["--config", os.path.join(ROOT, "configs", f"vit_cifar10.py:{variant}"),
            f"--config.model.source={vit}", "--config.data.image_size=32",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
            "--config.data.splits=('train[:50%]', 'train[50%:]', 'test')",
            "--config.data.download=False", "--workdir", str(tmp_path / "run")]
    with tfds.testing.mock_data(num_examples=16):
        assert cli.main(["train", *args, *SHORT]) == 0
    result = json.load(open(tmp_path / "run" / "test_metrics.json"))
    assert result["test"]["num_examples"] == 16


def test_transfer_mistakes_stop_before_training(text_stand_ins, tmp_path):
    args = _text_args("lora", text_stand_ins, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"(?s)LoRA rule 0 'bert/\*\*/querry/kernel' matches no parameter.*query"):
        cli.main(["train", *args, "--config.transfer.lora.rules=(('bert/**/querry/kernel', 8, 16),)"])
    with pytest.raises(SystemExit, match=r"transfer.lora.rules: .*'kernel' leaf|kernel with >= 2 axes"):
        cli.main(["train", *args, "--config.transfer.lora.rules=(('bert/**/query/bias', 8, 16),)"])
    args = _text_args("l2sp", text_stand_ins, tmp_path / "run")
    with pytest.raises(SystemExit, match="transfer.l2sp replaces weight decay"):
        cli.main(["train", *args, "--config.optim.weight_decay=0.01"])
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.fixture(scope="module")
def vision_stand_ins(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    return stand_ins.tiny_efficientnet(str(d / "effnet")), stand_ins.elpv_folder(str(d / "elpv"))


def _elpv_args(variant, vision_stand_ins, workdir):
    effnet, elpv = vision_stand_ins
    return ["--config", os.path.join(ROOT, "configs", f"effnet_elpv.py:{variant}"),
            f"--config.model.source={effnet}", f"--config.model.config={stand_ins.TINY_EFFICIENTNET}",
            f"--config.data.path={elpv}", "--config.data.image_size=32", "--config.data.batch_size=8",
            "--config.data.eval_batch_size=8", "--config.data.splits=(0.5, 0.25, 0.25)",
            "--workdir", str(workdir)]


@pytest.mark.parametrize("variant", RECIPES["effnet_elpv.py"])
def test_effnet_elpv(variant, vision_stand_ins, tmp_path, capsys):
    """The vision quickstart on a tiny EfficientNet and an ELPV-shaped folder: it trains what
    the variant says, writes the figures, and predicting on the test images' files gives
    exactly eval's test metrics."""
    args = _elpv_args(variant, vision_stand_ins, tmp_path / "run")
    assert cli.main(["train", *args, *SHORT]) == 0
    out = capsys.readouterr().out
    assert "majority-class baseline" in out
    run = tmp_path / "run"
    result = json.load(open(run / "test_metrics.json"))
    assert result["test"]["num_examples"] == 16  # 2 of the 6 cells of each grade x cell type
    for name in ("confusion_matrix.png", "test_predictions.png", "curves.png"):
        assert os.path.getsize(run / name) > 1000
    if variant == "top":
        assert cli.main(["inspect", *args]) == 0
        table = capsys.readouterr().out
        assert "efficientnet/blocks/6" in table and "efficientnet/stem" in table
        assert cli.main(["eval", *args]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert cli.main(["predict", *args, "--input", str(run / "test_images.txt"),
                         "--output", str(tmp_path / "preds.csv")]) == 0
        with open(tmp_path / "preds.csv") as f:
            predicted = [row["label"] for row in csv.DictReader(f)]
        true = open(run / "test_labels.txt").read().split()
        assert len(predicted) == len(true) == 16
        accuracy = sum(p == t for p, t in zip(predicted, true)) / len(true)
        assert accuracy == pytest.approx(evaluated["accuracy"]) == pytest.approx(result["test"]["accuracy"])


@pytest.mark.parametrize("method", ["adabn", "dann"])
def test_effnet_elpv_adapt(method, vision_stand_ins, tmp_path, capsys):
    """:adapt trains on the monocrystalline cells and tests on the polycrystalline ones (the
    source's test beside it); AdaBN re-estimates the batch norms of an EfficientNet, whose
    blocks have dropout and stochastic depth; DANN trains on source + unlabelled target batches."""
    args = _elpv_args("adapt", vision_stand_ins, tmp_path / "run")
    assert cli.main(["train", *args, *SHORT, f"--config.adapt.method={method}"]) == 0
    out = capsys.readouterr().out
    assert "source-domain test" in out and "no-transfer baseline" in out
    result = json.load(open(tmp_path / "run" / "test_metrics.json"))
    assert result["test"]["num_examples"] == result["source_test"]["num_examples"] == 8  # 2 per grade
    for split in ("test", "source_test"):
        assert np.isfinite(result[split]["loss"]) and 0.0 <= result[split]["macro_f1"] <= 1.0


def test_effnet_elpv_full_and_scratch(vision_stand_ins, tmp_path):
    """:full starts from every pretrained tensor, :scratch from none; both train every parameter."""
    from jaxfer import config as jconfig, experiment, masks, tree

    for variant in ("full", "scratch"):
        args = _elpv_args(variant, vision_stand_ins, tmp_path / variant)
        spec, overrides = jconfig.split_overrides(args[:-2])
        cfg = jconfig.load_with_overrides(spec[1], overrides)
        model = experiment.build_model(cfg)
        backbone = [p for p in tree.flatten(model.params) if not p.startswith("classifier/")]
        if variant == "full":
            assert set(backbone) <= set(model.report.loaded)
            assert sorted(model.report.reinitialized) == ["classifier/bias", "classifier/kernel"]
        else:  # nothing pretrained survives
            assert not model.report.loaded and set(backbone) <= set(model.report.reinitialized)
        trainable = masks.trainable_mask(model.params, experiment._rules(cfg))
        assert all(jax.tree_util.tree_leaves(trainable))

"""Bad input is named before compute: CSV/JSONL problems by file and line, empty texts
counted, labels against the head, token ids against the vocabulary, lengths against the
position table (truncated, never NaN), and the library entry points (fit, model.apply)."""

import json
import logging

import jax
import numpy as np
import pytest

from jaxfer import data
from jaxfer.errors import ConfigError, DataError, NonFiniteError
from jaxfer.train import TrainState, linen_apply, losses, make_train_step
from jaxfer.train.loop import fit

import _resume_script as task  # tests/ is on sys.path under pytest


# ----------------------------------------------------------------- files
def test_broken_jsonl_line_is_named_with_its_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"text": "c", lab\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        data.read_jsonl(path)
    path.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        data.read_jsonl(path)


def test_csv_long_fields_read_and_bad_rows_are_named(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    long = "word " * 40000  # 200,000 characters: over csv's default 131,072 limit
    path.write_text(f"text,label\nshort,x\n\"{long}\",y\n")
    src = data.read_csv(path)
    assert len(src) == 2 and len(src.columns["text"][1]) == len(long)
    from jaxfer.data import tables

    monkeypatch.setattr(tables, "CSV_FIELD_LIMIT", 1000)  # an unbalanced quote swallows the rest
    path.write_text("text,label\na,x\n\"b,y\n" + "more,z\n" * 300)
    with pytest.raises(DataError, match=r"d\.csv:\d+: not valid CSV: field larger than field limit "
                                        r"\(1000\) \(an unbalanced quote\?\)"):
        data.read_csv(path)
    path.write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(DataError, match=r"d\.csv:3: 3 fields, the header has 2"):
        data.read_csv(path)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv: no rows"):
        data.read_csv(path)


def test_missing_column_names_the_columns_there(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("tweet,sentiment\na,x\n")
    with pytest.raises(DataError, match=r"d\.csv: no column\(s\) \['text'\].*\['tweet', 'sentiment'\]"):
        data.read_csv(path, label="sentiment")


def test_empty_nan_and_null_texts_are_skipped_and_counted(tmp_path, caplog):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nfine,x\n,y\nNaN,x\n   ,y\nnull,x\nalso fine,y\nno label,\n")
    with caplog.at_level(logging.WARNING):
        src = data.read_csv(csv_path)
    assert list(src.columns["text"]) == ["fine", "also fine"]
    assert list(src.columns["id"]) == [0, 5]  # kept rows keep their row numbers
    assert "5 of 7 rows 4 with an empty text (lines 3, 4, 5, 6); 1 without a label (lines 8)" \
        in caplog.text
    with pytest.raises(DataError, match="5 of 7 rows"):
        data.read_csv(csv_path, empty="error")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": null, "label": "x"}\n{"text": NaN, "label": "x"}\n'
                     '{"label": "y"}\n{"text": "ok", "label": "y"}\n')
    assert list(data.read_jsonl(jsonl).columns["text"]) == ["ok"]
    jsonl.write_text('{"text": "", "label": "x"}\n')
    with pytest.raises(DataError, match="1 of 1 rows.*no row left"):
        data.read_jsonl(jsonl)


def test_regression_target_that_is_not_a_number_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": "high"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: regression target 'high'"):
        data.read_jsonl(path, task="regression")


def test_multitask_columns_follow_their_rows(tmp_path):
    """Each task's column is read by row number: a row skipped for lack of its own label (or
    text) never shifts another task's labels; a task without a label there holds -100 / NaN."""
    import ml_collections

    from jaxfer import objective

    path = tmp_path / "d.csv"
    path.write_text("text,sentiment,confidence\na,pos,0.5\n,neg,0.1\nc,,0.9\nd,neg,\ne,pos,0.2\n")
    cfg = ml_collections.ConfigDict({
        "data": {"kind": "csv", "path": str(path), "text": "text"},
        "multitask": {"tasks": (("sentiment", "classification", 2, 1.0, ("neg", "pos")),
                                ("confidence", "regression", 1))}})
    src = data.read_csv(path, label="sentiment", label_names=("neg", "pos"))  # rows a, d, e
    src = objective.with_task_columns(cfg, src, data.read_csv)
    assert src.columns["id"].tolist() == [0, 3, 4]
    assert src.columns["sentiment"].tolist() == [1, 0, 1]
    np.testing.assert_array_equal(src.columns["confidence"], np.float32([0.5, np.nan, 0.2]))
    src = data.read_csv(path, label="confidence", task="regression")  # rows a, c, e
    src = objective.with_task_columns(cfg, src, data.read_csv)
    assert src.columns["sentiment"].tolist() == [1, -100, 1]


def test_unknown_source_kind_lists_the_kinds():
    with pytest.raises(ConfigError, match=r"unknown data.kind 'parquet'.*'csv'"):
        data.make_source("parquet", path="x")


# ------------------------------------------------------------- the head
def _mlp_run(labels, label_names=None):
    import optax

    model, tx = task.MLP(), optax.adam(0.01)
    params = model.init(jax.random.key(0), np.zeros((1, task.FEATURES)), train=False)["params"]
    state = TrainState.create(params, tx, rng=0)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx)
    x = np.random.default_rng(0).normal(size=(len(labels), task.FEATURES)).astype(np.float32)
    source = data.from_arrays({"x": x, "label": np.asarray(labels, np.int32)})
    batches = data.TrainIterator(source, 4, seed=0)
    return fit(state, step, batches, steps=4, label_names=label_names, log_every=1,
               max_nonfinite_skips=0, progress=False)


@pytest.mark.parametrize("bad", [5, -1])
def test_labels_outside_the_head_never_train_with_a_finite_loss(bad):
    labels = [0, 1, 2, bad] * 2
    with pytest.raises(DataError, match=rf"labels \[{bad}\] are outside \[0, 3\)"):
        _mlp_run(labels, label_names=("a", "b", "c"))
    with pytest.raises(NonFiniteError, match="labels outside"):  # without label_names: NaN loss
        _mlp_run(labels)


def test_labels_of_every_split_are_checked_against_num_classes():
    from jaxfer import validate

    with pytest.raises(DataError, match=r"4 classes \['a', 'b', 'c', 'd'\] but model.num_classes=3"):
        validate.labels({"train": np.array([0, 1])}, ("a", "b", "c", "d"), 3, "classification")
    with pytest.raises(DataError, match=r"1 test labels are outside \[0, 3\)"):
        validate.labels({"train": np.array([0, 1]), "test": np.array([3, 0])}, None, 3, "classification")


def test_fit_on_an_empty_iterator_is_an_error():
    state, train_step, _, _, _ = task.make_task()
    with pytest.raises(DataError, match="yielded no batch"):
        fit(state, train_step, iter([]), steps=3, progress=False)
    with pytest.raises(ConfigError, match="steps must be a positive"):
        fit(state, train_step, iter([]), steps=0, progress=False)


def test_batch_size_zero_names_the_problem():
    with pytest.raises(ValueError, match="batch size must be a positive integer, got 0"):
        data.local_batch_size(0, 1)


# ------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from jaxfer.weights.load import load
    from tests import stand_ins

    path = stand_ins.tiny_bert(str(tmp_path_factory.mktemp("bert") / "bert"), num_layers=1)
    return load(path)


def test_model_limits_come_from_the_family(bert):
    assert bert.text_limits() == {"vocab_size": 30522, "max_positions": 64}


def test_model_apply_refuses_inputs_that_would_give_nan_or_wrong_numbers(bert):
    ids = np.ones((1, 8), np.int32)
    out = bert.apply(None, input_ids=ids)
    assert np.all(np.isfinite(out["last_hidden_state"]))
    with pytest.raises(TypeError, match=r"pass them as keywords: model.apply\(params, \*\*batch\)"):
        bert.apply(None, {"input_ids": ids})
    for bad, what in ((30522, r"\[1, 30522\]"), (-3, r"\[-3, 1\]")):
        with pytest.raises(DataError, match=what):
            bert.apply(None, input_ids=np.where(np.arange(8) == 2, bad, ids).astype(np.int32))
    with pytest.raises(DataError, match="65 tokens but the model's position table holds 64"):
        bert.apply(None, input_ids=np.ones((1, 65), np.int32))


def test_pipeline_truncates_to_the_position_table_and_refuses_foreign_token_ids(bert, caplog):
    texts = ["word " * 200, "short"]
    src = data.from_arrays({"text": np.array(texts, object), "label": np.array(["a", "b"], object)},
                           label="label")
    with caplog.at_level(logging.WARNING):
        batches = data.make_pipeline(src, global_batch_size=2, train=False, tokenizer=bert.tokenizer(),
                                     max_length=512, **bert.text_limits())
    batch = next(iter(batches))
    assert batch["input_ids"].shape == (2, 64) and "truncated to 64 tokens" in caplog.text
    out = bert.apply(None, **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    assert np.all(np.isfinite(out["last_hidden_state"]))
    with pytest.raises(DataError, match=r"token ids span \[\d+, \d+\] but the model's vocabulary holds \[0, 1000\)"):
        data.make_pipeline(src, global_batch_size=2, train=False, tokenizer=bert.tokenizer(),
                           max_length=16, vocab_size=1000)


def test_a_recipe_sized_in_epochs_is_valid_and_steps_or_epochs_is_required():
    """``train.steps=0`` with ``train.epochs`` > 0 is a run length (``:fast``); the validation
    added with the reliability work refused it until a timed run of ``:fast`` failed."""
    import os

    from jaxfer import config as config_lib, validate

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "minilm_tweets.py")
    validate.config(config_lib.load_with_overrides(recipe + ":fast", []))  # steps 0, epochs 1.8
    validate.config(config_lib.load_with_overrides(recipe + ":top2", [("train.steps", "0"),
                                                                      ("train.epochs", "2.0")]))
    for overrides, message in (
            ([("train.steps", "0"), ("train.epochs", "0.0")], "train.steps must be > 0, got 0"),
            ([("train.steps", "5"), ("train.epochs", "1.0")], "not both"),
            ([("train.steps", "0"), ("train.epochs", "-1.0")], "train.epochs must be > 0, got -1.0")):
        with pytest.raises(ConfigError, match=message):
            validate.config(config_lib.load_with_overrides(recipe + ":top2", overrides))

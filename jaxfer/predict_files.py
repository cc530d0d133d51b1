"""Predict on files: texts (CSV / JSONL) or images (a folder, a list, files) in, a CSV out.

    jaxfer predict --config configs/minilm_tweets.py --workdir runs/top2 --input new.csv --output preds.csv
    jaxfer predict --config configs/my_images.py --workdir runs/img --input photos/ --output preds.csv

Inputs, by what they are:

* a ``.csv`` / ``.jsonl`` file: one text per row, in the recipe's text column
  (``data.text``); any other columns, a label column included, are ignored;
* a folder: every image file under it, recursively, in sorted order;
* a ``.txt`` file: one image path per line (relative to the list's folder);
* image files given directly (``--input a.png --input b.jpg``).

The output CSV has one row per input, in input order: the text (or the image
path), the predicted ``label`` and one ``prob:<class>`` column per class
(``labels``, ``;``-separated, for multi-label; ``value:<i>`` for regression).
Rows are written as they are predicted, chunk by chunk, under a progress bar.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import IMAGE_EXTENSIONS
from jaxfer.data.tables import read_csv, read_jsonl
from jaxfer.inference import Predictor

TEXT_FILES = (".csv", ".jsonl")


def read_texts(path: str, column: str) -> list[str]:
    """The ``column`` of a CSV or JSONL file (no label needed)."""
    read = read_csv if path.lower().endswith(".csv") else read_jsonl
    return list(read(path, text=column, label=None).columns[column])


def list_images(inputs: Sequence[str]) -> list[str]:
    """Image paths from folders (recursive, sorted), ``.txt`` lists and files, in the order given."""
    paths: list[str] = []
    for x in inputs:
        if os.path.isdir(x):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(x) for f in fs
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {x!r}")
            paths += found
        elif x.lower().endswith(".txt"):
            base = os.path.dirname(os.path.abspath(x))
            with open(x) as f:
                paths += [os.path.join(base, line.strip()) for line in f if line.strip()]
        elif x.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(x)
        else:
            raise ValueError(f"{x!r} is not a folder, a .txt list of images or an image file "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) do not exist, e.g. {missing[0]!r}")
    return paths


def read_inputs(inputs: Sequence[str], predictor: Predictor) -> tuple[str, list[str]]:
    """``(first output column name, items)`` for the predictor's kind; errors name the file."""
    if not inputs:
        raise ValueError("give at least one --input")
    for x in inputs:
        if not os.path.exists(x):
            raise FileNotFoundError(f"--input {x!r} does not exist")
    if predictor.kind == "text":
        if len(inputs) != 1 or not inputs[0].lower().endswith(TEXT_FILES):
            raise ValueError(f"a text model predicts on one .csv or .jsonl file; got {list(inputs)}")
        column = predictor.spec.preprocessing.get("text", "text")
        return column, read_texts(inputs[0], column)
    return "path", list_images(inputs)


def header(predictor: Predictor, first: str, num_outputs: int) -> list[str]:
    names = predictor.names(num_outputs)
    if predictor.spec.task == "regression":
        return [first] + [f"value:{n}" for n in names]
    label = "labels" if predictor.spec.task == "multi_label" else "label"
    return [first, label] + [f"prob:{n}" for n in names]


def _rows(predictor: Predictor, items: Sequence[Any], outputs: dict[str, np.ndarray]) -> Iterator[list]:
    if "probs" not in outputs:
        for x, v in zip(items, outputs["logits"]):
            yield [x] + [f"{float(q):.6g}" for q in v]
        return
    for x, row, p in zip(items, predictor.to_rows(outputs), outputs["probs"]):
        label = ";".join(row["labels"]) if "labels" in row else row["label"]
        yield [x, label] + [f"{float(q):.6f}" for q in p]


def predict_files(predictor: Predictor, inputs: Sequence[str], output: str, *,
                  chunk_size: int = 256, progress: bool = True) -> str:
    """Predict every item of ``inputs`` and write ``output`` (see the module docstring)."""
    from tqdm.auto import tqdm

    first, items = read_inputs(list(inputs), predictor)
    if not items:
        raise ValueError(f"{list(inputs)} hold nothing to predict")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bar = tqdm(total=len(items), desc="predict", unit="ex", disable=not progress)
    with open(output, "w", newline="") as f:
        writer = None
        for lo in range(0, len(items), chunk_size):
            chunk = items[lo:lo + chunk_size]
            outputs = predictor(chunk)
            if writer is None:
                writer = csv.writer(f)
                writer.writerow(header(predictor, first, outputs["logits"].shape[-1]))
            writer.writerows(_rows(predictor, chunk, outputs))
            bar.update(len(chunk))
    bar.close()
    return output

"""Text tables -> sources: CSV and JSON-lines files, rows of dicts.

Every problem with a file is a :class:`~jaxfer.errors.DataError` naming the
file and the line (a broken JSON line, a CSV field over the size limit, a NUL
byte, a missing column, a regression target that is not a number, an empty
file), found while reading, before any compute.

Rows without a usable text (missing, ``null``, NaN, blank, or the strings
``"nan"``/``"null"`` that spreadsheet exports write for them) and rows without
a label (the same empty values) are *skipped* with one warning that counts
them and names their first lines (``empty="skip"``, the default) or *refused*
(``empty="error"``). Kept rows keep their row number as ``id``, so every
example can be traced back to its line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import ArraySource, encode_labels
from jaxfer.errors import DataError

logger = logging.getLogger(__name__)

CSV_FIELD_LIMIT = 16 * 2**20  # characters; a field this long is an unbalanced quote, not a text
_EMPTY_STRINGS = {"", "nan", "null"}
_SHOWN = 5


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return value.strip().lower() in _EMPTY_STRINGS
    return False


def _lines(lines: Sequence[int]) -> str:
    more = f" and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return ", ".join(map(str, lines[:_SHOWN])) + more


def from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    text: str | Sequence[str] = "text",
    label: str | None = "label",
    task: str = "classification",
    label_names: Sequence[str] | None = None,
    empty: str = "skip",
    where: str = "records",
    lines: Sequence[int] | None = None,
) -> ArraySource:
    """Rows (dicts) -> :class:`ArraySource` with text column(s), ``label`` and ``id``.

    ``text`` is one column name or several (e.g. ``("premise", "hypothesis")``);
    they keep their names. ``task`` is ``"classification"`` (names -> ids, the
    vocabulary recorded as ``label_names``) or ``"regression"`` (float32
    targets). ``id`` is the row number. ``where`` and ``lines`` (the line of
    each row) name the file and lines in errors and warnings.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if empty not in ("skip", "error"):
        raise ValueError(f"empty must be 'skip' or 'error', got {empty!r}")
    lines = list(lines) if lines is not None else list(range(1, len(records) + 1))
    text_cols = [text] if isinstance(text, str) else list(text)
    wanted = text_cols + ([label] if label else [])
    if not records:
        raise DataError(f"{where}: no rows (an empty file, or a header only)")
    columns = list(records[0])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(f"{where}: no column(s) {missing}; the columns are {columns}")
    # a field absent from a later row (JSON lines) counts as empty, like null
    empty_text = [i for i, r in enumerate(records) if any(_is_empty(r.get(c)) for c in text_cols)]
    no_label = [i for i, r in enumerate(records) if label and _is_empty(r.get(label))]
    dropped = sorted(set(empty_text) | set(no_label))
    if dropped:
        what = [f"{len(empty_text)} with an empty text (lines {_lines([lines[i] for i in empty_text])})"
                if empty_text else "",
                f"{len(no_label)} without a label (lines {_lines([lines[i] for i in no_label])})"
                if no_label else ""]
        message = f"{where}: {len(dropped)} of {len(records)} rows " + "; ".join(w for w in what if w)
        if empty == "error" or len(dropped) == len(records):
            raise DataError(message + (": no row left" if len(dropped) == len(records) else ""))
        logger.warning("%s: skipped", message)
    keep = np.setdiff1d(np.arange(len(records)), dropped)
    rows = [records[i] for i in keep]
    cols: dict[str, np.ndarray] = {c: np.asarray([str(r[c]) for r in rows], dtype=object)
                                   for c in text_cols}
    cols["id"] = keep.astype(np.int64)
    vocab = None
    if label:
        values = [r.get(label) for r in rows]
        if task == "classification":
            try:
                cols["label"], vocab = encode_labels(values, label_names)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        else:
            targets = np.empty(len(rows), np.float32)
            for k, (i, v) in enumerate(zip(keep, values)):
                try:
                    targets[k] = float(v)
                except (TypeError, ValueError):
                    raise DataError(f"{where}:{lines[i]}: regression target {v!r} in column "
                                    f"{label!r} is not a number") from None
            if not np.all(np.isfinite(targets)):
                bad = [lines[i] for i, t in zip(keep, targets) if not np.isfinite(t)]
                raise DataError(f"{where}: regression targets that are inf on lines {_lines(bad)}")
            cols["label"] = targets
    return ArraySource(cols, vocab)


@contextlib.contextmanager
def _field_limit(limit: int):
    old = csv.field_size_limit()
    csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_csv(
    path: str | os.PathLike,
    *,
    text: str | Sequence[str] = "text",
    label: str | None = "label",
    task: str = "classification",
    label_names: Sequence[str] | None = None,
    empty: str = "skip",
    delimiter: str = ",",
    encoding: str = "utf-8",
) -> ArraySource:
    """A CSV file with a header row -> :class:`ArraySource` (see :func:`from_records`).

    Undecodable bytes are replaced rather than failing the whole file; fields up
    to :data:`CSV_FIELD_LIMIT` characters are read.
    """
    where = os.fspath(path)
    records, lines = [], []
    with open(path, newline="", encoding=encoding, errors="replace") as f, _field_limit(CSV_FIELD_LIMIT):
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                records.append(row)
                lines.append(reader.line_num)
        except csv.Error as e:
            hint = " (an unbalanced quote?)" if "field larger" in str(e) else ""
            raise DataError(f"{where}:{reader.line_num + 1}: not valid CSV: {e}{hint}") from None
    for row, line in zip(records, lines):
        if None in row:  # DictReader's key for fields beyond the header
            raise DataError(f"{where}:{line}: {len(row) - 1 + len(row[None])} fields, the header "
                            f"has {len(reader.fieldnames or [])}")
    return from_records(records, text=text, label=label, task=task, label_names=label_names,
                        empty=empty, where=where, lines=lines)


def read_jsonl(
    path: str | os.PathLike,
    *,
    text: str | Sequence[str] = "text",
    label: str | None = "label",
    task: str = "classification",
    label_names: Sequence[str] | None = None,
    empty: str = "skip",
) -> ArraySource:
    """A JSON-lines file (one object per line; blank lines ignored) -> :class:`ArraySource`."""
    where = os.fspath(path)
    records, lines = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}:{number}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            lines.append(number)
    return from_records(records, text=text, label=label, task=task, label_names=label_names,
                        empty=empty, where=where, lines=lines)

"""Checks of a run's inputs before any compute: the recipe's values, and the data against the head.

Each check raises one :class:`~jaxfer.errors.ConfigError` or
:class:`~jaxfer.errors.DataError` that names the key or the data and says what
would fix it; :func:`config` gathers every problem of a recipe into one message.
The data against the model's vocabulary and position table is checked where the
text is tokenised (:func:`jaxfer.data.text.check_token_ids`).
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer.errors import ConfigError, DataError


def _positive_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def _count(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0


def head(task: str, num_classes: Any) -> None:
    """``task`` is a known kind and ``num_classes`` fits it."""
    from jaxfer.tasks import FRAME_KINDS, KINDS, SEQUENCE_KINDS

    if task in SEQUENCE_KINDS:  # the model's own LM head: num_classes plays no part
        return
    if task not in KINDS + FRAME_KINDS:
        raise ConfigError(f"task must be one of {KINDS + SEQUENCE_KINDS + FRAME_KINDS}, got {task!r}")
    least = 2 if task == "classification" else 1
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < least:
        raise ConfigError(f"model.num_classes must be an integer >= {least} for task={task!r} "
                          f"(a single-label classifier needs two classes at least), got {num_classes!r}")


def run_length(train) -> list[str]:
    """What is wrong with the run's length (``train.steps`` or ``train.epochs``, exactly one
    of them > 0); ``[]`` when nothing is. :func:`jaxfer.experiment.train_steps` sizes it."""
    problems = []
    epochs = train.get("epochs", 0)
    if epochs:  # a length in passes over the data
        if not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > 0
                and math.isfinite(epochs)):
            problems.append(f"train.epochs must be > 0, got {epochs!r}")
        elif train.steps:
            problems.append(f"give train.steps ({train.steps!r}) or train.epochs ({epochs:g}), not both: "
                            "set the other to 0")
    elif not _positive_int(train.steps):
        problems.append(f"train.steps must be > 0, got {train.steps!r} (or give train.epochs > 0)")
    return problems


def config(cfg) -> None:
    """Every value of a recipe that cannot run, in one :class:`ConfigError`."""
    from jaxfer.data.pipeline import source_kind

    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    t, d, m = cfg.train, cfg.data, cfg.model
    try:
        head(cfg.task, m.num_classes)
    except ConfigError as e:
        problems.append(str(e))
    problems.extend(run_length(t))
    for key in ("batch_size", "eval_batch_size"):
        need(_positive_int(d[key]), f"data.{key} must be > 0, got {d[key]!r}")
    accumulate = cfg.optim.get("accumulate", 1) or 1
    need(_positive_int(accumulate), f"optim.accumulate must be >= 1, got {accumulate!r}")
    if _positive_int(d.batch_size) and _positive_int(accumulate):
        need(d.batch_size % accumulate == 0,
             f"data.batch_size={d.batch_size} is not a multiple of optim.accumulate={accumulate} "
             "(each step splits the batch into that many equal micro-batches)")
    need(_positive_int(t.get("log_every", 1)), f"train.log_every must be >= 1, got {t.get('log_every')!r}")
    for key in ("eval_every", "checkpoint_every", "patience", "max_nonfinite_skips"):
        if key in t:
            need(_count(t[key]), f"train.{key} must be >= 0, got {t[key]!r}")
    need(_positive_int(t.get("keep", 1)), f"train.keep must be >= 1, got {t.get('keep')!r}")
    rules = cfg.get("rules")
    need(isinstance(rules, (list, tuple)) and len(rules) > 0 and all(
         isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in rules),
         f"rules must be a non-empty sequence of (pattern, value) pairs, got {rules!r}")
    names = d.get("label_names")
    if names and cfg.task == "classification" and isinstance(m.num_classes, int):
        need(len(names) == m.num_classes, f"data.label_names has {len(names)} names {list(names)} "
             f"but model.num_classes={m.num_classes}")
    try:
        kind = source_kind(d.kind)
    except ConfigError as e:
        problems.append(str(e))
    else:
        if kind.modality == "text":
            need(_positive_int(d.get("max_length")), f"data.max_length must be > 0, got {d.get('max_length')!r}")
        if kind.splits == "fractions":
            fractions = np.asarray(d.splits, np.float64) if len(d.splits) else np.zeros(0)
            need(len(fractions) == 3 and np.all(fractions >= 0) and abs(fractions.sum() - 1) < 1e-6,
                 f"data.splits must be three fractions (train, validation, test) >= 0 summing "
                 f"to 1, got {tuple(d.splits)}")
    if problems:
        raise ConfigError("; ".join(problems))


def labels(split_labels: dict[str, np.ndarray | None], label_names: Sequence[str] | None,
           num_classes: int, task: str) -> None:
    """Class ids of every split (scanned once) and the data's label names against the head."""
    if task != "classification":
        return
    if label_names is not None and len(label_names) != num_classes:
        raise DataError(
            f"the data has {len(label_names)} classes {list(label_names)[:20]} but "
            f"model.num_classes={num_classes}: set --config.model.num_classes={len(label_names)}, "
            "or data.label_names to the classes the head should have")
    for split, ids in split_labels.items():
        if ids is None or not len(ids):
            continue
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"{split} labels are {ids.dtype}, not class ids")
        bad = (ids < 0) | (ids >= num_classes)
        if bad.any():
            raise DataError(f"{int(bad.sum())} {split} labels are outside [0, {num_classes}) "
                            f"(e.g. {sorted(set(ids[bad].tolist()))[:5]}) for a head of "
                            f"model.num_classes={num_classes}")


def sizes(split_sizes: dict[str, int], batch_size: int) -> None:
    """No empty split; at least one training batch."""
    empty = [name for name, n in split_sizes.items() if n == 0]
    if empty:
        raise DataError(f"the {' and '.join(empty)} split(s) hold no example (sizes "
                        f"{split_sizes}); give more data or change data.splits")
    if split_sizes.get("train", 0) < batch_size:
        raise DataError(f"the training split holds {split_sizes['train']} examples, fewer than "
                        f"one batch of data.batch_size={batch_size}")

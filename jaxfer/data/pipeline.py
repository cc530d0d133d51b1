"""Assembling sources, splits, shards, preprocessing and iterators.

A typical text run::

    src = read_csv("tweets.csv", text="text", label="sentiment")
    train_src, val_src = split_source(src, (0.9, 0.1), seed=0)
    train = make_pipeline(train_src, global_batch_size=32, train=True,
                          tokenizer="path/to/model", max_length=64)
    val = make_pipeline(val_src, global_batch_size=32, train=False,
                        tokenizer="path/to/model", max_length=64)
    batch = next(train)        # {"input_ids", "attention_mask", "token_type_ids",
                               #  "label", "id", "mask"}, numpy, per-process batch

and an image run::

    src = read_image_folder("flowers/train")      # or TfdsSource("cifar10", "train")
    train = make_pipeline(src, global_batch_size=64, train=True, image_size=224,
                          mixup_alpha=0.2, num_classes=len(src.label_names))
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer.data import audio as audio_lib
from jaxfer.data import buckets as buckets_lib
from jaxfer.data import elpv
from jaxfer.data import image as image_lib
from jaxfer.data import sources as sources_lib
from jaxfer.data import tables
from jaxfer.data import text as text_lib
from jaxfer.data.iterators import EvalBatches, Prefetch, TrainIterator
from jaxfer.data.split import check_process, local_batch_size, shard_indices, split_indices
from jaxfer.data.tfds_source import TfdsSource
from jaxfer.errors import ConfigError, DataError


def process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fill in ``jax.process_index()`` / ``jax.process_count()`` where ``None``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    check_process(process_index, process_count)
    return process_index, process_count


def shard(source, process_index: int | None = None, process_count: int | None = None):
    """``(local_source, total)``: this process's strided shard and the full size.

    A source that is already sharded (``TfdsSource`` reads only its own
    ``even_splits`` part) is returned as is, after checking it was built for the
    same process layout.
    """
    pi, pc = process_info(process_index, process_count)
    if hasattr(source, "total") and hasattr(source, "process_count"):
        if (source.process_index, source.process_count) != (pi, pc):
            raise ValueError(
                f"source was sharded for process {source.process_index}/{source.process_count}, "
                f"pipeline runs as {pi}/{pc}"
            )
        return source, int(source.total)
    total = len(source)
    return (source if pc == 1 else source.select(shard_indices(total, pi, pc))), total


def split_source(
    source, fractions: Sequence[float] = (0.8, 0.1, 0.1), *, seed: int = 0, stratify: bool = True
) -> tuple[Any, ...]:
    """Deterministic disjoint splits of a source with ``select`` (arrays, CSV,
    JSONL, image folders), stratified by its ``stratum`` column when it has one
    (finer groups, e.g. ELPV's grade x cell type), else by ``label`` when it holds class ids."""
    labels = _class_labels(source) if stratify else None
    parts = split_indices(len(source), fractions, seed=seed, stratify=labels)
    return tuple(source.select(p) for p in parts)


def _class_labels(source) -> np.ndarray | None:
    labels = getattr(source, "labels", None)
    if labels is None and hasattr(source, "columns"):
        labels = source.columns.get("stratum", source.columns.get("label"))
    if labels is None or not np.issubdtype(np.asarray(labels).dtype, np.integer):
        return None
    return np.asarray(labels)


def pipeline(
    source,
    *,
    global_batch_size: int,
    train: bool,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    map_fn=None,
    batch_fn=None,
    process_index: int | None = None,
    process_count: int | None = None,
    workers: int = 0,
    prefetch: int = 0,
    buckets: buckets_lib.Buckets | None = None,
):
    """Shard ``source`` for this process and batch it.

    Training (``train=True``) gives a resumable :class:`TrainIterator` (wrapped in
    :class:`Prefetch` when ``prefetch > 0``) with ``global_batch_size //
    process_count`` examples per batch and the same number of steps per epoch on
    every process. Evaluation gives an :class:`EvalBatches` whose passes cover this
    process's shard exactly once, with the same number of batches on every process.
    ``buckets`` (lengths by index of the source given) cut token columns per batch;
    with several processes only the global-order training path can use them (the
    shapes must agree across processes), so they are dropped elsewhere.
    """
    pi, pc = process_info(process_index, process_count)
    bs = local_batch_size(global_batch_size, pc)
    presharded = hasattr(source, "total") and hasattr(source, "process_count")
    if train and pc > 1 and not presharded:
        # every process sees the global order and takes its slice of each global
        # batch: same batches, same result, whatever the number of processes
        it = TrainIterator(source, bs, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                           map_fn=map_fn, batch_fn=batch_fn, workers=workers,
                           process_index=pi, process_count=pc, buckets=buckets)
        return Prefetch(it, prefetch) if prefetch else it
    local, total = shard(source, pi, pc)
    if pc > 1:
        buckets = None
    if train:
        it = TrainIterator(local, bs, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                           examples_per_epoch=total // pc, map_fn=map_fn,
                           batch_fn=batch_fn, workers=workers, buckets=buckets)
        return Prefetch(it, prefetch) if prefetch else it
    largest_shard = -(-total // pc)
    return EvalBatches(local, bs, num_batches=-(-largest_shard // bs), map_fn=map_fn,
                       seed=seed, workers=workers, buckets=buckets)


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One kind of data source a recipe names in ``data.kind``.

    ``make`` builds it (its keyword arguments come from the recipe's ``data``
    section by name, ``path`` standing for ``root``; see :func:`source_from_config`);
    ``modality`` is ``"text"`` (tokenised) or ``"image"`` (decoded and resized);
    ``splits`` says what ``data.splits`` holds: ``"fractions"`` of one source
    (split with :func:`split_source`) or split ``"names"`` (one source each).
    """

    make: Callable[..., Any]
    modality: str | None
    splits: str = "fractions"


SOURCES: dict[str, SourceKind] = {
    "csv": SourceKind(tables.read_csv, "text"),
    "jsonl": SourceKind(tables.read_jsonl, "text"),
    "arrays": SourceKind(sources_lib.from_arrays, None),
    "image_folder": SourceKind(sources_lib.read_image_folder, "image"),
    "audio": SourceKind(audio_lib.read_audio_csv, "audio"),
    "elpv": SourceKind(elpv.read_elpv, "image"),
    "tfds": SourceKind(TfdsSource, "image", splits="names"),
}
_CONFIG_NAMES = {"root": "path"}  # a reader's argument -> the recipe key that holds it


def source_kind(kind: str) -> SourceKind:
    if kind not in SOURCES:
        raise ConfigError(f"unknown data.kind {kind!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[kind]


def make_source(kind: str, **kwargs):
    """``SOURCES[kind].make(**kwargs)``: ``csv``/``jsonl`` (path, text, label, task,
    label_names), ``arrays`` (columns, label), ``image_folder`` (root), ``audio`` (a CSV of
    WAV paths with transcripts or labels: path, audio, text, label, sampling_rate, max_seconds),
    ``elpv`` (root, threshold, cell_type),
    ``tfds`` (name, split, process_index, process_count, data_dir)."""
    return source_kind(kind).make(**kwargs)


def source_from_config(data_cfg: Mapping[str, Any], **extra: Any):
    """The sources a recipe's ``data`` section describes, as ``(train, validation, test, ...)``.

    Each argument of the kind's ``make`` is taken from the section key of the
    same name (``extra`` wins; unset keys keep the reader's default). A
    ``"fractions"`` kind is read once (:func:`read_source`) and split by
    ``data.splits`` (stratified, ``data.seed``/``extra["seed"]``); a ``"names"``
    kind is read once per split name.
    """
    seed = extra.pop("seed", 0)
    source = read_source(data_cfg, **extra)
    if isinstance(source, tuple):
        return source
    return split_source(source, tuple(data_cfg["splits"]), seed=seed)


def read_source(data_cfg: Mapping[str, Any], **extra: Any):
    """The unsplit source of a ``"fractions"`` kind (a tuple, one per split name, for a
    ``"names"`` kind), its reader's arguments taken as in :func:`source_from_config`."""
    kind = source_kind(data_cfg["kind"])
    params = inspect.signature(kind.make).parameters
    extra.pop("seed", None)
    kwargs = {}
    for name in params:
        key = _CONFIG_NAMES.get(name, name)
        if key in extra:
            kwargs[name] = extra[key]
        elif key in data_cfg and name != "split" and data_cfg[key] not in (None, "", (), []):
            value = data_cfg[key]
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    for name in ("path", "root"):
        if name in kwargs and not os.path.exists(kwargs[name]):
            raise DataError(f"data.path {kwargs[name]!r} does not exist (data.kind={data_cfg['kind']!r})")
    if kind.splits == "names":
        return tuple(kind.make(**kwargs, split=split) for split in data_cfg["splits"])
    return kind.make(**kwargs)


def make_pipeline(
    source,
    *,
    global_batch_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    text: str = "text",
    text_pair: str | None = None,
    length_buckets: Sequence[int] | str | None = "auto",
    group_by_length: bool = False,
    cache_dir: str | None = None,
    image_size: int | None = None,
    image_options: dict | None = None,
    mixup_alpha: float = 0.0,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    workers: int = 0,
    prefetch: int = 0,
):
    """:func:`pipeline` plus the usual preprocessing, chosen by arguments.

    * ``tokenizer`` (object, folder or hub id): tokenise ``text`` (and
      ``text_pair``) of this process's shard once, to ``max_length``; each batch
      is then cut to the smallest of ``length_buckets`` that holds it
      (:mod:`jaxfer.data.buckets`; ``"auto"``: 16, 32, 64, ... up to
      ``max_length``; ``None``: every batch ``max_length`` long), and with
      ``group_by_length`` training batches hold texts of similar length. With
      ``cache_dir`` the tokens are kept there and reused (:func:`text.tokenize`).
      ``vocab_size`` / ``max_positions`` (``**model.text_limits()``) check the
      tokens against the model: ``max_length`` is cut to the position table
      with a warning, ids outside the vocabulary are a ``DataError`` (see
      :mod:`jaxfer.data.text`), never NaN later.
    * ``image_size``: decode ``"image"`` into ``pixel_values`` with
      :func:`image.image_transform` (training augmentation when ``train``;
      ``image_options`` are passed through, e.g. ``resize``, ``mean``, ``std``).
    * ``mixup_alpha > 0`` (training only, needs ``num_classes``): mixup per batch.
    """
    if isinstance(length_buckets, str) and length_buckets != "auto":
        raise ValueError(f"length_buckets must be 'auto', a list of lengths or None, got {length_buckets!r}")
    pi, pc = process_info(process_index, process_count)
    presharded = hasattr(source, "total") and hasattr(source, "process_count")
    global_order = train and pc > 1 and not presharded  # pipeline() takes the slices
    local, total = (source, len(source)) if global_order else shard(source, pi, pc)
    buckets = None
    if tokenizer is not None:
        max_length = text_lib.fit_max_length(max_length, max_positions)
        local = text_lib.tokenize(local, tokenizer, max_length, text=text, text_pair=text_pair,
                                  cache_dir=cache_dir)
        text_lib.check_token_ids(local.columns["input_ids"], vocab_size, f"text column {text!r}")
        if length_buckets:
            sizes = None if isinstance(length_buckets, str) else length_buckets
            buckets = buckets_lib.Buckets.for_tokens(local.columns, text_lib.TOKEN_KEYS, sizes,
                                                     group=group_by_length and train)
    if not global_order and local is not source:  # sharded: keep the full size for step counts
        local = _Sharded(local, pi, pc, total)
    map_fn = batch_fn = None
    if image_size is not None:
        map_fn = image_lib.image_transform(image_size, train=train, **(image_options or {}))
    if train and mixup_alpha > 0:
        if num_classes is None:
            raise ValueError("mixup needs num_classes")
        batch_fn = functools.partial(image_lib.mixup, alpha=mixup_alpha, num_classes=num_classes)
    return pipeline(local, global_batch_size=global_batch_size, train=train, seed=seed,
                    num_epochs=num_epochs, map_fn=map_fn, batch_fn=batch_fn,
                    process_index=pi, process_count=pc, workers=workers, prefetch=prefetch,
                    buckets=buckets)


class _Sharded:
    """A local shard that remembers the process layout and the full size."""

    def __init__(self, local, process_index: int, process_count: int, total: int):
        self.local, self.total = local, total
        self.process_index, self.process_count = process_index, process_count
        self.label_names = getattr(local, "label_names", None)

    def __len__(self):
        return len(self.local)

    def __getitem__(self, i):
        return self.local[i]

    def gather(self, indices):
        return sources_lib.gather(self.local, indices)

"""Batches that carry cached rows: training and evaluation passes on what was computed once.

* :class:`OnDemand` -- a lazy :class:`~jaxfer.transfer.features.Features`: the row of
  an example is computed the first time a batch holds it, then kept (in memory or
  a ``.npy`` file mapped from a directory, reused by later runs);
* :func:`with_features` -- batches (a resumable training iterator or re-iterable
  evaluation batches) with the rows of their example ids added under a key, cut
  to the batch's width when batches are cut to their longest sequence;
* :func:`source_ids` -- the example ids a pipeline draws from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxfer.transfer.features import (ID_KEY, Batch, FeatureFn, Features, check_ids, Runner, save_atomic,
                                      fingerprint)


def source_ids(batches: Any, id_key: str = ID_KEY) -> np.ndarray:
    """The example ids a training iterator or evaluation batches draw from."""
    source = getattr(getattr(batches, "iterator", batches), "source", None)
    while source is not None and not hasattr(source, "columns") and hasattr(source, "local"):
        source = source.local
    if source is not None and hasattr(source, "columns") and id_key in source.columns:
        return np.asarray(source.columns[id_key])
    if hasattr(batches, "__next__"):
        raise ValueError("cannot list the example ids of this training iterator (its source has no "
                         f"{id_key!r} column)")
    return np.concatenate([np.asarray(b[id_key])[np.asarray(b.get("mask", 1)) > 0] for b in batches])


class OnDemand:
    """Rows computed the first time an example is seen, then kept: a lazy :class:`Features`.

    ``take(ids, valid, batch)`` runs ``fn`` on ``batch`` when any of its ids has
    no row yet and stores the rows; later epochs only read. So the first pass
    costs what running the frozen part in every step costs, and every later
    pass skips it; no pass over data the run never reaches is made. With
    ``directory``, the rows live in ``directory/key/rows.npy`` (mapped
    read-write) and ``filled.npy`` says which are done (written after the rows
    are flushed), so another run with the same key reuses them.

    ``row_shape`` is the full shape of a row when batches may be cut shorter
    (:mod:`jaxfer.data.buckets`): a row computed from a batch cut to ``t``
    tokens fills its first ``t`` positions, and the rest stays zero (padding).
    """

    def __init__(self, fn: FeatureFn, variables: Any, ids: np.ndarray, *, directory: str | None = None,
                 key: str = "on_demand", id_key: str = ID_KEY, row_shape: tuple[int, ...] | None = None):
        self.ids = np.asarray(ids)
        self.row_shape = None if row_shape is None else tuple(row_shape)
        self.index = Features(self.ids, [np.zeros((len(self.ids), 0), np.int8)])  # id -> row
        self.where = os.path.join(directory, key) if directory else None
        self._runner = Runner(fn, variables, id_key)
        self._rows: np.ndarray | None = None
        self._filled = np.zeros(len(self.ids), bool)
        self.computed = 0
        if self.where and os.path.exists(os.path.join(self.where, "filled.npy")):
            with open(os.path.join(self.where, "meta.json")) as f:
                meta = json.load(f)
            if meta["ids"] == fingerprint(self.ids):
                self._rows = np.load(os.path.join(self.where, "rows.npy"), mmap_mode="r+")
                self._filled = np.load(os.path.join(self.where, "filled.npy"))
        self.reused = int(self._filled.sum())

    # -- the Features interface
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.ids), *(() if self._rows is None else self._rows.shape[1:]))

    @property
    def dtype(self):
        return np.float32 if self._rows is None else self._rows.dtype

    @property
    def nbytes(self) -> int:
        return 0 if self._rows is None else int(self._rows.nbytes)

    @property
    def seconds(self) -> float:
        """Spent computing rows in this run (compilation excluded)."""
        return self._runner.seconds

    @property
    def directory(self) -> str | None:
        return self.where

    @property
    def filled(self) -> int:
        return int(self._filled.sum())

    def take(self, ids: np.ndarray, valid: np.ndarray | None = None, batch: Batch | None = None) -> np.ndarray:
        ids = np.asarray(ids)
        valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid) > 0
        rows = self.index.rows(ids[valid])
        if not self._filled[rows].all():
            if batch is None:
                raise KeyError("rows not computed yet and no batch to compute them from")
            self._fill(rows, batch)
        out = np.zeros((len(ids), *self.shape[1:]), self.dtype)
        out[np.flatnonzero(valid)] = self._rows[rows]
        return out

    def _fill(self, rows: np.ndarray, batch: Batch) -> None:
        got_ids, values = self._runner([batch])
        got = self.index.rows(got_ids)
        if self._rows is None:
            self._allocate(self.row_shape or values.shape[1:], values.dtype)
        new = ~self._filled[got]
        self._rows[(got[new], *(slice(0, d) for d in values.shape[1:]))] = values[new]
        self._filled[got] = True
        self.computed += int(new.sum())
        if self.where and jax.process_index() == 0:
            self._rows.flush()  # the rows reach the file before the mark that says they did
            save_atomic(os.path.join(self.where, "filled.npy"), self._filled)

    def _allocate(self, row_shape: tuple[int, ...], dtype) -> None:
        shape = (len(self.ids), *row_shape)
        if not self.where:
            self._rows = np.zeros(shape, dtype)  # pages are committed as rows are written
            return
        os.makedirs(self.where, exist_ok=True)
        self._rows = np.lib.format.open_memmap(os.path.join(self.where, "rows.npy"), mode="w+",
                                               dtype=dtype, shape=shape)
        with open(os.path.join(self.where, "meta.json"), "w") as f:
            json.dump({"ids": fingerprint(self.ids), "shape": list(shape), "dtype": np.dtype(dtype).str}, f)

    def array(self) -> np.ndarray:
        if self._rows is None or not self._filled.all():
            raise ValueError(f"only {self.filled} of {len(self.ids)} rows are computed")
        return np.asarray(self._rows)


class with_features:  # noqa: N801 -- reads as a function: with_features(batches, features)
    """``batches`` with ``batch[key] = features.take(batch["id"], batch["mask"])``.

    Wraps a resumable training iterator (``get_state``/``set_state`` pass
    through, so a resumed run sees the same batches) or re-iterable evaluation
    batches (each ``iter()`` is a fresh pass). ``drop`` names batch entries to
    leave out (model inputs the cached part replaces). With ``length_key``, rows
    with a time axis are cut to the width of ``batch[length_key]`` (batches cut
    to a length bucket, :mod:`jaxfer.data.buckets`).
    """

    def __init__(self, batches, features: Features, *, key: str = "features", id_key: str = ID_KEY,
                 drop: Sequence[str] = (), length_key: str | None = None):
        self.batches, self.features, self.key, self.id_key = batches, features, key, id_key
        self.drop, self.length_key = tuple(drop), length_key
        self._it = batches if hasattr(batches, "__next__") else None

    def _add(self, batch: Batch) -> Batch:
        check_ids(batch, self.id_key)
        out = {k: v for k, v in batch.items() if k not in self.drop}
        rows = self.features.take(batch[self.id_key], batch.get("mask"), batch=batch)
        if self.length_key in batch and rows.ndim >= 3:  # a batch cut to its longest sequence
            rows = rows[:, :np.shape(batch[self.length_key])[1]]
        out[self.key] = rows
        return out

    def __iter__(self):
        if self._it is not None:
            return self
        return (self._add(b) for b in self.batches)

    def __next__(self) -> Batch:
        if self._it is None:
            raise TypeError("these batches are re-iterable, not an iterator: use iter()")
        return self._add(next(self._it))

    def __len__(self) -> int:
        return len(self.batches)

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)

    def __getattr__(self, name):  # steps_per_epoch, batch_size, ... of the wrapped batches
        if name in ("batches", "_it"):
            raise AttributeError(name)
        return getattr(self.batches, name)

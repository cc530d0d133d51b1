"""Run a frozen network once over a source and keep what it computes, keyed by example id.

A frozen backbone is a pure function of its input (see
:func:`jaxfer.train.step.frozen_inference_scope`), so its output for an example
never changes while it stays frozen. This module computes such outputs once:

* :func:`head_input_fn` -- the pooled features a ``Classifier`` head reads
  (``pool(backbone outputs)``, before its dropout and dense);
* :func:`module_output_fn` -- the output of any module, by path
  (``bert/encoder/layer/3``: the input of layer 4; see :mod:`jaxfer.transfer.prefix`);
* :func:`extract` / :func:`cached` -- run such a function over evaluation
  batches (every example once, padding dropped) into :class:`Features`: rows
  keyed by the batches' ``"id"``, in memory or as chunked ``.npy`` files in a
  directory, keyed by a :func:`fingerprint` of the model and the data, reused by
  any later run with the same fingerprint (an interrupted extraction resumes at
  the first missing chunk);
* :func:`head_apply` -- a ``Classifier`` head on cached features, with the task
  model's params (:mod:`jaxfer.transfer.batches` puts the rows into batches,
  or computes them on first use).

Training a head on cached features is the same computation as training it
through the frozen backbone (``tests/test_transfer_features.py``), at the cost
of the head alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxfer.models.heads import pool, train_kwarg
from jaxfer.train.step import linen_apply

Batch = dict[str, np.ndarray]
FeatureFn = Callable[[Any, Batch], jax.Array]
ID_KEY = "id"
INDEX_FILE = "index.json"


# ------------------------------------------------------------- fingerprints
def _feed(h, x: Any) -> None:
    if isinstance(x, Mapping):
        h.update(b"{")
        for k in sorted(x, key=str):
            _feed(h, str(k))
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for v in x:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
        a = np.ascontiguousarray(np.asarray(x))
        if a.dtype == object:
            _feed(h, [str(v) for v in a.ravel()])
            return
        h.update(f"a{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).ravel() if a.size else b"")
    else:
        h.update(f"{type(x).__name__}:{x!r}".encode())


def fingerprint(*parts: Any) -> str:
    """A short hex digest of nested dicts/lists/arrays/scalars (array bytes, shapes and
    dtypes included; dict keys sorted): equal inputs, equal digest."""
    h = hashlib.blake2b(digest_size=10)
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def source_fingerprint(batches: Any) -> str:
    """Fingerprint of what evaluation ``batches`` hold: their source's columns when it
    has them (tokenised text), else every batch (decoded images)."""
    source = getattr(batches, "source", None)
    while source is not None and not hasattr(source, "columns") and hasattr(source, "local"):
        source = source.local  # a per-process shard
    if source is not None and hasattr(source, "columns"):
        return fingerprint(dict(source.columns), getattr(batches, "batch_size", None))
    return fingerprint([{k: v for k, v in b.items()} for b in batches])


# ------------------------------------------------------ what a network computes
def _bound_path(module: nn.Module) -> str:
    return "/".join(map(str, module.path))


def as_apply(model: Any, input_keys: Sequence[str] | None = None):
    """A Linen module as an ``apply_fn`` (:func:`jaxfer.train.step.linen_apply`); an
    ``apply_fn`` (a LoRA- or adapter-wrapped one, say) as it is."""
    return linen_apply(model, input_keys) if isinstance(model, nn.Module) else model


def head_input_fn(model: Any, head: str = "classifier", *,
                  input_keys: Sequence[str] | None = None) -> FeatureFn:
    """``fn(variables, batch) -> (B, D)``: what the ``Classifier`` at path ``head`` pools
    from the backbone (``heads.pool(outputs, pooling, attention_mask)``), in inference mode.

    ``model`` is the task model (a Linen module) or an ``apply_fn`` running it.
    The head's dense (and dropout) are skipped; under ``jit`` nothing after the
    pooling is computed.
    """
    apply_fn = as_apply(model, input_keys)

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and _bound_path(m) == head:
            outputs = args[0] if args else kwargs["outputs"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            return pool(outputs, getattr(m, "pooling", None) or "cls", mask)
        return next_fun(*args, **kwargs)

    def fn(variables, batch):
        with nn.intercept_methods(interceptor):
            return apply_fn(variables, batch, train=False)[0]["logits"]

    return fn


def module_output_fn(model: Any, path: str, *, input_keys: Sequence[str] | None = None) -> FeatureFn:
    """``fn(variables, batch) -> array``: the output of the submodule at ``path`` (its
    ``__call__``), in inference mode (``model``: a Linen module or an ``apply_fn``).
    Under ``jit`` nothing after it is computed."""
    apply_fn = as_apply(model, input_keys)

    def fn(variables, batch):
        captured: list[Any] = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _bound_path(context.module) == path:
                captured.append(out)
            return out

        with nn.intercept_methods(interceptor):
            apply_fn(variables, batch, train=False)
        if len(captured) != 1:
            raise ValueError(f"module {path!r} was called {len(captured)} times; need exactly once")
        return captured[0]

    return fn


# ----------------------------------------------------------------- features
@dataclasses.dataclass
class Features:
    """Rows of a per-example array, keyed by example id.

    ``chunks`` are arrays (in memory, or ``.npy`` files mapped read-only) of
    rows; ``ids[i]`` is the id of global row ``i``. :meth:`take` gathers rows by id.
    """

    ids: np.ndarray
    chunks: list[np.ndarray]
    directory: str | None = None
    reused: bool = False  # read back from an earlier run
    seconds: float = 0.0  # spent computing the rows, compilation excluded (by the run that computed them)

    def __post_init__(self):
        self.ids = np.asarray(self.ids)
        sizes = [len(c) for c in self.chunks]
        if sum(sizes) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids for {sum(sizes)} rows")
        self._starts = np.cumsum([0] + sizes)
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids, self._rows = self.ids[order], order
        if len(self.ids) and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            raise ValueError("example ids are not unique; features are keyed by id")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        tail = self.chunks[0].shape[1:] if self.chunks else ()
        return (len(self.ids), *tail)

    @property
    def dtype(self):
        return self.chunks[0].dtype if self.chunks else np.float32

    @property
    def nbytes(self) -> int:
        return int(sum(c.nbytes for c in self.chunks))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Global row of each id (``KeyError`` naming unknown ids)."""
        ids = np.asarray(ids)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(len(self._sorted_ids) - 1, 0))
        bad = (self._sorted_ids[pos] != ids) if len(self._sorted_ids) else np.ones(ids.shape, bool)
        if np.any(bad):
            raise KeyError(f"no cached features for example ids {ids[bad][:5].tolist()}")
        return self._rows[pos]

    def take(self, ids: np.ndarray, valid: np.ndarray | None = None, batch: Batch | None = None) -> np.ndarray:
        """Rows for ``ids``; rows where ``valid`` is false (padding) are zeros. (``batch``,
        the batch the ids come from, is for :class:`OnDemand`; here it is unused.)"""
        ids = np.asarray(ids)
        valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid) > 0
        out = np.zeros((len(ids), *self.shape[1:]), self.dtype)
        if not valid.any():
            return out
        rows = self.rows(ids[valid])
        where = np.flatnonzero(valid)
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        for c in np.unique(chunk):
            sel = chunk == c
            out[where[sel]] = self.chunks[c][rows[sel] - self._starts[c]]
        return out

    def array(self) -> np.ndarray:
        """All rows in one in-memory array (ordered like ``ids``)."""
        return np.concatenate(self.chunks) if self.chunks else np.zeros(self.shape, self.dtype)


def _iter_groups(batches: Iterable[Batch], group: int) -> Iterator[list[Batch]]:
    buf: list[Batch] = []
    for b in batches:
        buf.append(b)
        if len(buf) == group:
            yield buf
            buf = []
    if buf:
        yield buf


class Runner:
    """(Used by :mod:`jaxfer.transfer.batches` too.) ``fn`` compiled once (ahead of time, not timed), then run over groups of batches;
    ``seconds`` adds up the time spent computing, compilation excluded."""

    def __init__(self, fn: FeatureFn, variables: Any, id_key: str):
        self.jitted = jax.jit(lambda variables, batch: fn(variables, batch))
        self.variables, self.id_key = variables, id_key
        self.compiled: dict[Any, Any] = {}
        self.seconds = 0.0

    def _fn(self, batch: Batch):
        shapes = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in sorted(batch.items()))
        if shapes not in self.compiled:
            self.compiled[shapes] = self.jitted.lower(self.variables, batch).compile()
        return self.compiled[shapes]

    def __call__(self, group: list[Batch]) -> tuple[np.ndarray, np.ndarray]:
        """Features and ids of the real rows of some batches (dispatch all, then fetch)."""
        inputs = [_model_inputs(b, self.id_key) for b in group]
        fns = [self._fn(b) for b in inputs]
        start = time.perf_counter()
        outs = [f(self.variables, b) for f, b in zip(fns, inputs)]
        ids, rows = [], []
        for b, out in zip(group, outs):
            keep = np.asarray(b.get("mask", np.ones(len(b[self.id_key]))), np.float32) > 0
            rows.append(np.asarray(out)[keep])
            ids.append(np.asarray(b[self.id_key])[keep])
        self.seconds += time.perf_counter() - start
        return np.concatenate(ids), np.concatenate(rows)


def _model_inputs(batch: Batch, id_key: str) -> Batch:
    return {k: v for k, v in batch.items() if k not in (id_key, "label", "mask")}


def check_ids(batch: Batch, id_key: str) -> None:
    if id_key not in batch:
        raise KeyError(f"batches need an example id under {id_key!r} to key cached features; "
                       f"they hold {sorted(batch)}")


def extract(fn: FeatureFn, variables: Any, batches: Iterable[Batch], *, id_key: str = ID_KEY,
            chunk_batches: int = 32) -> Features:
    """``fn`` (jitted) over every real row of ``batches``, in memory."""
    run = Runner(fn, variables, id_key)
    ids, chunks = [], []
    for group in _iter_groups(batches, chunk_batches):
        check_ids(group[0], id_key)
        i, rows = run(group)
        ids.append(i)
        chunks.append(rows)
    return Features(np.concatenate(ids) if ids else np.zeros((0,), np.int64), chunks, seconds=run.seconds)


def save_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # a chunk file is whole or absent


def cached(fn: FeatureFn, variables: Any, batches: Iterable[Batch], *, directory: str | None,
           key: str, id_key: str = ID_KEY, chunk_batches: int = 32) -> Features:
    """:func:`extract`, kept as ``directory/key/{ids,rows}_<i>.npy`` chunks and reused.

    ``key`` must change whenever the result would (use :func:`fingerprint` of the
    frozen params, the function and :func:`source_fingerprint` of the batches).
    A complete cache (its ``index.json`` written last) is read back without
    running ``fn``; a partial one keeps its finished chunks and computes the rest.
    Chunks are mapped read-only (``np.load(mmap_mode="r")``), so a large cache
    (boundary activations) lives in the page cache, not in the process. Without
    ``directory``, this is :func:`extract`. Only process 0 writes.
    """
    if not directory:
        return extract(fn, variables, batches, id_key=id_key, chunk_batches=chunk_batches)
    where = os.path.join(directory, key)
    index_path = os.path.join(where, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        return _load(where, index["chunks"], reused=True, seconds=index.get("seconds", 0.0))
    os.makedirs(where, exist_ok=True)
    run = Runner(fn, variables, id_key)
    names = []
    for c, group in enumerate(_iter_groups(batches, chunk_batches)):
        check_ids(group[0], id_key)
        name = f"{c:05d}"
        names.append(name)
        if all(os.path.exists(os.path.join(where, f"{p}_{name}.npy")) for p in ("ids", "rows")):
            continue  # done by an interrupted run
        ids, rows = run(group)
        if jax.process_index() == 0:
            save_atomic(os.path.join(where, f"rows_{name}.npy"), rows)
            save_atomic(os.path.join(where, f"ids_{name}.npy"), ids)
    seconds = run.seconds
    if jax.process_index() == 0:
        with open(index_path + ".tmp", "w") as f:
            json.dump({"chunks": names, "key": key, "seconds": seconds}, f)
        os.replace(index_path + ".tmp", index_path)
    return _load(where, names, seconds=seconds)


def _load(where: str, names: Sequence[str], reused: bool = False, seconds: float = 0.0) -> Features:
    ids = [np.load(os.path.join(where, f"ids_{n}.npy")) for n in names]
    rows = [np.load(os.path.join(where, f"rows_{n}.npy"), mmap_mode="r") for n in names]
    return Features(np.concatenate(ids) if ids else np.zeros((0,), np.int64), rows,
                    directory=where, reused=reused, seconds=seconds)


# ------------------------------------------------------------ head on features
class HeadOnFeatures(nn.Module):
    """A ``Classifier`` head applied to cached pooled features ``(B, D)``.

    It sits at the same path (``name``) as in the task model, so the task
    model's params tree (and the dropout rng of the head) serve unchanged.
    """

    head: nn.Module
    name_in_model: str = "classifier"

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        head = self.head.clone(parent=self, name=self.name_in_model, pooling="pooler")
        return {"logits": head({"pooler_output": features}, None, **train_kwarg(self.head, train))}


def head_apply(head: nn.Module, name: str = "classifier", key: str = "features"):
    """``apply_fn(variables, batch, *, train, rng)`` of ``head`` on ``batch[key]`` -- the
    ``jaxfer.train.step`` contract, so ``make_train_step``/``make_eval_step`` train and
    evaluate a head on cached features with the task model's params."""
    return linen_apply(HeadOnFeatures(head, name), input_keys=(key,))

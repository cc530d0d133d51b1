"""Batch iterators: resumable training streams and exact evaluation passes.

The contract the training loop relies on:

* batches are ``dict[str, np.ndarray]`` in host memory, every one with a float32
  ``"mask"`` of shape ``(batch,)``;
* :class:`TrainIterator` is seeded and resumable: ``get_state()`` returns
  ``{"epoch": e, "index": i, "seed": s}`` (JSON-serialisable; ``index`` is the
  next batch within epoch ``e``) and ``set_state(state)`` makes the iterator
  yield exactly what the original yielded after that state. The example order of
  epoch ``e`` is a pure function of ``(seed, e)``; per-example augmentation draws
  from ``np.random.default_rng([seed, e, position])`` and per-batch augmentation
  from ``np.random.default_rng([seed, e, index, 1])``, so resumed runs also see
  the same augmentations. Incomplete final batches are dropped (static shapes).
* :class:`EvalBatches` visits every example exactly once per pass; the final
  partial batch is zero-padded to full size with ``mask`` 0.0 on the padding.
* with ``buckets`` (:class:`jaxfer.data.buckets.Buckets`), token columns are cut
  to the smallest bucket size that holds the batch's longest sequence (in a
  multi-process run: the global batch's), so batch shapes come from a small fixed set.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxfer.data.buckets import Buckets
from jaxfer.data.sources import gather, stack

Batch = dict[str, np.ndarray]
MapFn = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
BatchFn = Callable[[Batch, np.random.Generator], Batch]


def _load(source, indices, map_fn, seeds, pool) -> Batch:
    """Gather ``indices``; with ``map_fn`` apply it to each example with its own rng."""
    if map_fn is None:
        return gather(source, indices)

    def one(k):
        return map_fn(dict(source[int(indices[k])]), np.random.default_rng(seeds[k]))

    ks = range(len(indices))
    return stack(list(pool.map(one, ks)) if pool else [one(k) for k in ks])


class TrainIterator(Iterator[Batch]):
    """Seeded, resumable, shuffled batches of ``batch_size`` examples.

    Args:
      source: a random-access source (``len``, ``[i]``, optionally ``gather``),
        already restricted to this process's shard.
      batch_size: examples per batch on this process (the per-process batch).
      seed: shuffling and augmentation seed.
      shuffle: reshuffle every epoch (a permutation drawn from ``(seed, epoch)``).
      num_epochs: stop after this many epochs; ``None`` streams forever.
      examples_per_epoch: use only the first this many examples of each epoch's
        order (default: all). Multi-host pipelines set it to the smallest shard
        size so every process runs the same number of steps.
      map_fn: per-example ``fn(example, rng) -> example`` (decoding, augmentation).
      batch_fn: per-batch ``fn(batch, rng) -> batch`` (e.g. mixup).
      workers: threads for ``map_fn`` (0: in the calling thread).
      process_index, process_count: with ``process_count > 1``, ``source`` is
        the whole (unsharded) dataset, the epoch order is global and this
        process yields its ``process_index``-th slice of every global batch of
        ``batch_size * process_count`` examples. The global batches, and so the
        trained parameters, are then the same for any number of processes.
      buckets: cut token columns to length buckets (by ``source`` index); with
        ``buckets.group`` each epoch's order is also grouped by length (from
        ``(seed, epoch)``, so still resumable).
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        examples_per_epoch: int | None = None,
        map_fn: MapFn | None = None,
        batch_fn: BatchFn | None = None,
        workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        buckets: Buckets | None = None,
    ):
        self.source = source
        self.buckets = buckets
        self.batch_size = int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch_size = self.batch_size * self.process_count
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        n = len(source) if examples_per_epoch is None else int(examples_per_epoch)
        if n > len(source):
            raise ValueError(f"examples_per_epoch={n} > {len(source)} examples")
        self.examples_per_epoch = n
        self.steps_per_epoch = n // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {self.global_batch_size} is larger than the {n} "
                             "examples per epoch")
        self.map_fn, self.batch_fn = map_fn, batch_fn
        self._pool = ThreadPoolExecutor(workers) if workers and map_fn else None
        self._epoch, self._index = 0, 0
        self._order_epoch, self._order = None, None

    # -- the contract
    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"state was saved with seed {state['seed']} but this iterator has seed "
                f"{self.seed}; build the iterator with the saved seed"
            )
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index <= self.steps_per_epoch or epoch < 0:
            raise ValueError(f"bad state {dict(state)} for {self.steps_per_epoch} steps/epoch")
        self._epoch, self._index = epoch, index
        self._roll_over()

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of ``epoch``, in the order they are batched."""
        if self._order_epoch != epoch:
            n = len(self.source)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                     if self.shuffle else np.arange(n))[: self.examples_per_epoch]
            if self.buckets is not None and self.buckets.group:
                order = self.buckets.grouped(order, self.global_batch_size,
                                             np.random.default_rng([self.seed, epoch, 2]))
            self._order_epoch, self._order = epoch, order
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        e, i, bs = self._epoch, self._index, self.batch_size
        lo = i * self.global_batch_size + self.process_index * bs  # this process's slice
        indices = self.order(e)[lo : lo + bs]
        seeds = [[self.seed, e, p] for p in range(lo, lo + bs)]
        batch = _load(self.source, indices, self.map_fn, seeds, self._pool)
        if self.buckets is not None:  # the size of the global batch, the same on every process
            start = i * self.global_batch_size
            batch = self.buckets.cut(batch, self.buckets.size_for(
                self.order(e)[start : start + self.global_batch_size]))
        if self.batch_fn is not None:
            batch = self.batch_fn(batch, np.random.default_rng([self.seed, e, i, 1]))
        batch["mask"] = np.ones(bs, np.float32)
        self._index += 1
        self._roll_over()
        return batch

    def _roll_over(self):
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0


class EvalBatches:
    """Every example exactly once per pass, padded to static ``batch_size``.

    Iterate it as many times as needed; each ``iter()`` is a fresh pass in source
    order. ``num_batches`` (default: ``ceil(len / batch_size)``) may be larger, so
    that all processes of a multi-host run take the same number of steps: the
    extra batches are all padding (``mask`` all zeros). With ``buckets``, token
    columns are cut to the bucket of each batch's longest sequence.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        num_batches: int | None = None,
        map_fn: MapFn | None = None,
        seed: int = 0,
        workers: int = 0,
        buckets: Buckets | None = None,
    ):
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.buckets = buckets
        need = -(-len(source) // self.batch_size)
        self.num_batches = need if num_batches is None else int(num_batches)
        if self.num_batches < need:
            raise ValueError(f"num_batches={num_batches} cannot hold {len(source)} examples")
        self.map_fn = map_fn
        self._pool = ThreadPoolExecutor(workers) if workers and map_fn else None
        self._template: Batch | None = None

    def __len__(self) -> int:
        return self.num_batches

    def _pad(self, batch: Batch, n_real: int) -> Batch:
        pad = self.batch_size - n_real
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        batch["mask"] = (np.arange(self.batch_size) < n_real).astype(np.float32)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        n, bs = len(self.source), self.batch_size
        for b in range(self.num_batches):
            indices = np.arange(b * bs, min((b + 1) * bs, n))
            if len(indices) == 0:  # padding-only batch: shapes from the first example
                if n == 0:
                    raise ValueError("cannot make padding batches for an empty source")
                if self._template is None:
                    self._template = self._batch(np.arange(1))
                template = {k: v[:0] for k, v in self._template.items()}
                if self.buckets is not None:
                    template = self.buckets.cut(template, self.buckets.sizes[0])
                yield self._pad(template, 0)
                continue
            yield self._pad(self._batch(indices), len(indices))

    def _batch(self, indices: np.ndarray) -> Batch:
        seeds = [[self.seed, 0, int(p)] for p in indices]
        batch = _load(self.source, indices, self.map_fn, seeds, self._pool)
        if self.buckets is not None:
            batch = self.buckets.cut(batch, self.buckets.size_for(indices))
        return batch


class Prefetch(Iterator[Batch]):
    """Produce up to ``size`` batches ahead on a background thread.

    Keeps the wrapped iterator's contract: ``get_state()`` is the state after the
    last batch *handed out* (not the last one produced), and ``set_state`` drops
    whatever was produced ahead and restarts from the given state.
    """

    _DONE = object()

    def __init__(self, iterator: Iterator[Batch], size: int = 2):
        self.iterator, self.size = iterator, int(size)
        self._state = iterator.get_state() if hasattr(iterator, "get_state") else None
        self._start()

    def _start(self):
        self._queue: queue.Queue = queue.Queue(self.size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        daemon=True)
        self._thread.start()

    def _produce(self, q: queue.Queue, stop: threading.Event):
        stateful = self._state is not None
        try:
            for batch in self.iterator:
                item = (batch, self.iterator.get_state() if stateful else None)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item = self._DONE
        except BaseException as e:  # handed to the consumer
            item = e
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict[str, int]:
        if self._state is None:
            raise TypeError(f"{type(self.iterator).__name__} has no get_state")
        return dict(self._state)

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()
        self.iterator.set_state(state)
        self._state = self.iterator.get_state()
        self._start()

    def close(self) -> None:
        """Stop the background thread (the wrapped iterator stays usable)."""
        self._stop.set()
        self._thread.join()

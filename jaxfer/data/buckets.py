"""Length buckets: pad each text batch to the smallest of a few fixed lengths that holds it.

Tokenised text is stored padded to ``max_length``, and a batch of short texts
would carry mostly padding. With buckets ``sizes = (16, 32, 64, ..., max_length)``
a batch is cut to ``size = min(s in sizes: s >= longest sequence in the batch)``
columns, so

* a step costs what its texts need (attention is quadratic in the length);
* a jitted step compiles once per size it meets: a handful of shapes, not one
  per batch;
* nothing changes but the padding: the columns cut are padding in every row
  (attention mask 0), which the model never attends to, pooling never counts and
  losses never weigh -- the outputs of the real tokens and the loss are the
  same, up to float summation order. So cutting is on by default.

A sequence's *length* is ``1 +`` the index of its last real token (attention
mask 1), so left-padded tokenisers are handled too (nothing is cut).

Grouping (``group=True``, training only) goes further and changes which texts
share a batch: each epoch's shuffled order is cut into pools of ``pool *
batch_size`` examples, each pool is sorted by length, cut into batches, and the
batches of the epoch are shuffled. Batches then hold texts of similar length
(far less padding), every example is still seen once per epoch, and the order
is a pure function of ``(seed, epoch)``, so resumed runs see the same batches.
Its gradient noise differs from i.i.d. batches, so it is opt-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

POWERS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def default_sizes(max_length: int) -> tuple[int, ...]:
    """``(16, 32, 64, ...)`` below ``max_length``, then ``max_length`` itself."""
    return tuple(s for s in POWERS if s < max_length) + (int(max_length),)


def lengths(attention_mask: np.ndarray) -> np.ndarray:
    """``(n, T)`` mask -> ``(n,)`` int: 1 + index of the last nonzero entry (0 for none)."""
    m = np.asarray(attention_mask) != 0
    last = m.shape[1] - np.argmax(m[:, ::-1], axis=1)
    return np.where(m.any(axis=1), last, 0).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Cut batches of a tokenised source to bucket sizes (see the module doc).

    Attributes:
      lengths: ``(len(source),)`` sequence lengths (:func:`lengths`), by source index.
      sizes: ascending bucket sizes; the last is the stored (padded) length.
      keys: the ``(batch, length)`` columns to cut (``input_ids``, ``attention_mask``, ...).
      group: group training batches by length (opt-in; changes batch composition).
      pool: batches per sorted pool when grouping.
    """

    lengths: np.ndarray
    sizes: tuple[int, ...]
    keys: tuple[str, ...]
    group: bool = False
    pool: int = 50

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"bucket sizes must be distinct positive ints in ascending order, got {self.sizes}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "lengths", np.asarray(self.lengths, np.int64))
        if len(self.lengths) and self.lengths.max() > sizes[-1]:
            raise ValueError(f"a sequence of length {self.lengths.max()} exceeds the largest bucket {sizes[-1]}")

    @classmethod
    def for_tokens(cls, columns: Mapping[str, np.ndarray], keys: Sequence[str], sizes: Sequence[int] | None = None,
                   **kwargs) -> Buckets:
        """From tokenised columns (``attention_mask`` gives the lengths). ``sizes``
        default to :func:`default_sizes` of the stored length ``T``; given ones
        above ``T`` are dropped and ``T`` is always one."""
        mask = np.asarray(columns["attention_mask"])
        t = mask.shape[1]
        keys = tuple(k for k in keys if k in columns)
        sizes = tuple(sorted({int(s) for s in sizes if 0 < int(s) < t} | {t})) if sizes else default_sizes(t)
        return cls(lengths(mask), sizes, keys, **kwargs)

    def size_for(self, indices: np.ndarray) -> int:
        """The smallest size that holds every sequence of ``indices`` (source indices)."""
        longest = int(self.lengths[np.asarray(indices, np.int64)].max()) if len(indices) else 0
        return self.sizes[int(np.searchsorted(self.sizes, longest))]

    def cut(self, batch: dict, size: int) -> dict:
        """``batch`` with its :attr:`keys` columns cut to ``size``."""
        return {k: (v[:, :size] if k in self.keys else v) for k, v in batch.items()}

    def grouped(self, order: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """``order`` regrouped so that each run of ``batch_size`` has similar lengths
        (see the module doc); the examples are the same, the incomplete tail last."""
        order = np.asarray(order)
        full = len(order) // batch_size * batch_size
        pool = max(1, self.pool) * batch_size
        parts = []
        for lo in range(0, full, pool):
            chunk = order[lo:min(lo + pool, full)]
            parts.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
        batches = np.concatenate(parts).reshape(-1, batch_size) if parts else order[:0].reshape(0, batch_size)
        return np.concatenate([batches[rng.permutation(len(batches))].reshape(-1), order[full:]])

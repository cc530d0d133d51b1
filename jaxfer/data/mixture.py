"""Several datasets in one stream: multitask mixtures and source + target batches.

:class:`Mixture` draws one batch from each of several resumable training
iterators ("parts") and concatenates them, so every batch holds exactly
``sizes[name]`` rows of part ``name``, and adds an int32 column (``part_key``)
with each row's part index. The mixing ratio is therefore exact in every batch,
not only in expectation, and the state is the parts' states together:
``get_state() -> {name: part_state}``, ``set_state`` restores each, so a resumed
run sees the same batches.

Token columns cut to different length buckets (:mod:`jaxfer.data.buckets`) are
padded to the longest part's length. Columns that some parts lack are filled with "no label" values (``-100`` for
integer columns, NaN for float ones), which the losses and metrics of
:mod:`jaxfer.tasks` skip; ``hide`` replaces a part's columns by the same fill
(the labels of an unlabelled target domain). :class:`EvalChain` does the same
for evaluation: each part's padded batches in turn, every example once.

    sizes = mixture_sizes(32, {"sentiment": 3, "topic": 1})   # {"sentiment": 24, "topic": 8}
    train = Mixture({n: make_pipeline(src[n], global_batch_size=sizes[n], train=True, ...)
                     for n in sizes})
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer.data.text import TOKEN_KEYS

Batch = dict[str, np.ndarray]
IGNORE_INDEX = -100


def mixture_sizes(batch_size: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Rows per part in a batch of ``batch_size``, proportional to ``ratios``.

    Largest-remainder rounding (ties to the earlier part), so the sizes add up
    to ``batch_size``; every part with a positive ratio gets at least one row
    (an error if that is impossible).
    """
    names = list(ratios)
    r = np.asarray([float(ratios[n]) for n in names])
    if not names or (r < 0).any() or r.sum() <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {dict(ratios)}")
    exact = r / r.sum() * batch_size
    sizes = np.floor(exact).astype(int)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: batch_size - sizes.sum()]:
        sizes[i] += 1
    empty = [n for n, s, x in zip(names, sizes, r) if s == 0 and x > 0]
    if empty:
        raise ValueError(f"a batch of {batch_size} leaves no row for {empty} at ratios "
                         f"{dict(ratios)}: raise the batch size or the ratio")
    return {n: int(s) for n, s in zip(names, sizes)}


def _fill(like: np.ndarray, rows: int) -> np.ndarray:
    shape = (rows,) + like.shape[1:]
    if np.issubdtype(like.dtype, np.integer):
        return np.full(shape, IGNORE_INDEX, like.dtype)
    if np.issubdtype(like.dtype, np.floating):
        return np.full(shape, np.nan, like.dtype)
    raise ValueError(f"cannot fill a missing column of dtype {like.dtype} (only numbers have a "
                     f"'no label' value); give every part this column")


def _merge(batches: Sequence[Batch], hidden: Sequence[Sequence[str]], part_key: str,
           protect: Sequence[str] = ("mask",)) -> Batch:
    """Concatenate part batches, filling missing or hidden columns; add ``part_key``."""
    keys: dict[str, np.ndarray] = {}
    for b in batches:
        for k, v in b.items():
            keys.setdefault(k, np.asarray(v))
    out = {}
    for k, like in keys.items():
        pieces = []
        for b, hide in zip(batches, hidden):
            rows = len(next(iter(b.values())))
            if k in b and k not in hide:
                pieces.append(np.asarray(b[k]))
            elif k in protect:
                raise ValueError(f"column {k!r} missing from a part")
            else:
                pieces.append(_fill(like, rows))
        if k in TOKEN_KEYS and len({p.shape[1:] for p in pieces}) > 1:  # parts cut to other length buckets
            longest = max(p.shape[1] for p in pieces)
            pieces = [np.pad(p, [(0, 0), (0, longest - p.shape[1])]) for p in pieces]
        shapes = {p.shape[1:] for p in pieces}
        if len(shapes) > 1:
            raise ValueError(f"column {k!r} has different shapes per part {sorted(shapes)}: "
                             f"give the parts the same max_length / image_size")
        out[k] = np.concatenate(pieces)
    out[part_key] = np.concatenate([np.full(len(next(iter(b.values()))), i, np.int32)
                                    for i, b in enumerate(batches)])
    return out


class Mixture(Iterator[Batch]):
    """One batch of every part, concatenated in the order of ``parts``.

    Args:
      parts: ``{name: iterator}`` of training batches (resumable iterators, e.g.
        from :func:`jaxfer.data.make_pipeline` with ``global_batch_size`` =
        that part's share from :func:`mixture_sizes`).
      part_key: the column holding each row's part index (0, 1, ... in the order
        of ``parts``); ``"domain"`` for source (0) + target (1) batches.
      hide: ``{name: columns}`` replaced by "no label" values in that part.

    Stops when any part stops (parts built with ``num_epochs=None`` never do).
    """

    def __init__(self, parts: Mapping[str, Iterator[Batch]], *, part_key: str = "part",
                 hide: Mapping[str, Sequence[str]] | None = None):
        if not parts:
            raise ValueError("a mixture needs at least one part")
        unknown = sorted(set(hide or {}) - set(parts))
        if unknown:
            raise ValueError(f"hide names parts {unknown} that are not among {list(parts)}")
        self.parts = dict(parts)
        self.part_key = part_key
        self.hide = {n: tuple((hide or {}).get(n, ())) for n in self.parts}

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batches = [next(it) for it in self.parts.values()]
        return _merge(batches, list(self.hide.values()), self.part_key)

    def get_state(self) -> dict[str, Any]:
        return {n: it.get_state() for n, it in self.parts.items()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise ValueError(f"mixture state has no entry for parts {missing} (it has {sorted(state)})")
        for n, it in self.parts.items():
            it.set_state(state[n])


class EvalChain:
    """Each part's evaluation batches in turn (every example once), with missing
    columns filled as in :class:`Mixture` and the ``part_key`` column added."""

    def __init__(self, parts: Mapping[str, Iterable[Batch]], *, part_key: str = "part",
                 columns: Mapping[str, np.ndarray] | None = None):
        self.parts = dict(parts)
        self.part_key = part_key
        self._templates = dict(columns or {})

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def _columns(self) -> dict[str, np.ndarray]:
        """One example row of every column any part has (read from each part's first batch)."""
        if not self._templates:
            for p in self.parts.values():
                for k, v in next(iter(p)).items():
                    self._templates.setdefault(k, np.asarray(v)[:1])
        return self._templates

    def __iter__(self) -> Iterator[Batch]:
        columns = self._columns()
        for i, p in enumerate(self.parts.values()):
            for batch in p:
                rows = len(batch["mask"])
                full = {k: np.asarray(batch[k]) if k in batch else _fill(v, rows)
                        for k, v in columns.items()}
                full[self.part_key] = np.full(rows, i, np.int32)
                yield full

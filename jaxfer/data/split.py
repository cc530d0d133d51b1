"""Deterministic train/validation/test splits and per-host shards (index arrays)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_indices(
    n: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    seed: int = 0,
    stratify: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Split ``range(n)`` into disjoint, covering, sorted index arrays.

    ``fractions`` must sum to 1 (up to 1e-6). The split is a pure function of
    ``(n, fractions, seed, stratify)``. With ``stratify`` (one class id per example)
    each class is split separately in the same proportions, so rare classes appear
    in every part when they have enough examples.
    """
    fractions = np.asarray(fractions, np.float64)
    if np.any(fractions < 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    rng = np.random.default_rng(seed)
    if stratify is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(stratify)
        if len(labels) != n:
            raise ValueError(f"stratify has {len(labels)} labels for {n} examples")
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for group in groups:
        group = rng.permutation(group)
        bounds = np.round(np.cumsum(fractions) * len(group)).astype(int)
        bounds[-1] = len(group)
        for k, (lo, hi) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
            parts[k].append(group[lo:hi])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
    """The strided shard ``process_index, process_index + count, ...`` of ``range(n)``.

    Shards are disjoint and cover ``range(n)``; their sizes differ by at most one
    (the first ``n % process_count`` shards hold one more), as with
    ``tfds.even_splits``.
    """
    check_process(process_index, process_count)
    return np.arange(process_index, n, process_count, dtype=np.int64)


def shard_sizes(n: int, process_count: int) -> tuple[int, int]:
    """``(smallest, largest)`` shard size over processes."""
    return n // process_count, -(-n // process_count)


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``; an error unless it divides evenly."""
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"the batch size must be a positive integer, got {global_batch_size!r}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by process_count "
            f"{process_count}; choose a multiple of {process_count}"
        )
    return global_batch_size // process_count

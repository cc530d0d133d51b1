"""tensorflow-datasets as a random-access source, one shard per process.

``tfds.data_source`` reads datasets prepared in the ArrayRecord format with
``tensorflow-datasets`` alone, no TensorFlow needed. Datasets only available as
TFRecord need ``tfds.load`` and therefore TensorFlow: install ``jaxfer[tfds]``
(adds ``tensorflow-cpu``); :class:`TfdsSource` then falls back to reading this
process's shard into memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import ArraySource
from jaxfer.data.split import check_process

INSTALL_HINT = "pip install 'jaxfer[tfds]'"


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"tensorflow-datasets is not installed: {INSTALL_HINT}") from e
    return tfds


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _numeric(example: dict[str, Any], keys: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Keep ``keys`` (default: every non-string feature) as numpy arrays."""
    out = {}
    for k, v in example.items():
        v = np.asarray(v)
        if (k in keys) if keys is not None else v.dtype.kind not in "OSU":
            out[k] = v
    return out


class TfdsSource:
    """This process's shard of a tfds split: ``tfds.even_splits(split, n=count)[index]``.

    Args:
      name: tfds name, e.g. ``"cifar10"`` or ``"mnist:3.0.1"``.
      split: any tfds split string (``"train"``, ``"train[:90%]"``, ...).
      process_index, process_count: this process and how many read the split
        (defaults: ``jax.process_index()`` / ``jax.process_count()``).
      data_dir: tfds data directory (default: tfds's own).
      download: let tfds download and prepare the dataset if it is missing.
      keys: features to keep (default: every numeric feature; strings such as
        ``id`` are dropped because they cannot go to a device).

    ``source[i]`` is ``{feature: np.ndarray}``. ``total`` is the size of the whole
    split (all shards), ``label_names`` the ``ClassLabel`` names of ``"label"``
    when there is one.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        data_dir: str | None = None,
        download: bool = True,
        keys: Sequence[str] | None = None,
    ):
        import jax

        tfds = import_tfds()
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        check_process(pi, pc)
        self.name, self.split, self.keys = name, split, keys
        self.process_index, self.process_count = pi, pc
        shard = tfds.even_splits(split, n=pc)[pi] if pc > 1 else split
        kw = dict(data_dir=data_dir, download=download)
        try:
            self._data = tfds.data_source(name, split=shard, **kw)
            full = tfds.data_source(name, split=split, **kw) if pc > 1 else self._data
            self.total = len(full)
        except (ImportError, ModuleNotFoundError, NotImplementedError, ValueError) as e:
            if not _has_tensorflow():
                raise ImportError(
                    f"tfds.data_source could not read {name!r} ({type(e).__name__}: {e}). "
                    "Datasets not prepared as ArrayRecord are read with tfds.load, which "
                    f"needs TensorFlow: {INSTALL_HINT}"
                ) from e
            self._data = _load_with_tf(tfds, name, shard, keys, **kw)
            self.total = _num_examples(tfds, name, split, data_dir)
        self.label_names = _label_names(tfds, name, data_dir)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return _numeric(self._data[i], self.keys)


def _label_names(tfds, name: str, data_dir) -> tuple[str, ...] | None:
    try:
        feature = tfds.builder(name, data_dir=data_dir).info.features["label"]
        return tuple(feature.names)
    except Exception:  # no "label" feature, or not a ClassLabel
        return None


def _num_examples(tfds, name: str, split: str, data_dir) -> int:
    return int(tfds.builder(name, data_dir=data_dir).info.splits[split].num_examples)


def _load_with_tf(tfds, name, shard, keys, *, data_dir, download) -> ArraySource:
    """TFRecord fallback (needs TensorFlow): this shard, decoded, in memory."""
    ds = tfds.load(name, split=shard, data_dir=data_dir, download=download)
    rows = [_numeric(ex, keys) for ex in tfds.as_numpy(ds)]
    return ArraySource({k: np.stack([r[k] for r in rows]) for k in rows[0]})

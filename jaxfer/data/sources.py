"""Random-access sources of examples.

A *source* is anything with ``len(source)`` and ``source[i] -> dict[str, array]``
(one example). Sources may also offer ``gather(indices) -> dict[str, np.ndarray]``
(a stacked batch, fast for in-memory columns) and ``select(indices) -> source``
(a subset, used for splits and per-host shards).

* :class:`ArraySource` -- columns of equal length in memory (numpy arrays,
  CSV and JSONL read by :mod:`jaxfer.data.tables`, tokenised text).
* :class:`ImageFolderSource` -- ``root/<class_name>/*.png|jpg`` read lazily with PIL.
* ``jaxfer.data.tfds.TfdsSource`` -- tensorflow-datasets via ``tfds.data_source``.

Labels given as names are mapped to integer ids with a stable vocabulary: the
sorted set of names unless ``label_names`` fixes it; the vocabulary is recorded on
the source as ``label_names``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# ------------------------------------------------------------------- labels
def encode_labels(
    values: Sequence[Any], label_names: Sequence[str] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label names -> ``(int32 ids, vocabulary)``.

    Without ``label_names`` the vocabulary is the sorted set of names (stable across
    runs and machines). With it, an unknown name is an error.
    """
    names = [str(v) for v in values]
    vocab = tuple(label_names) if label_names is not None else tuple(sorted(set(names)))
    index = {n: i for i, n in enumerate(vocab)}
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in label_names {list(vocab)}")
    return np.asarray([index[n] for n in names], np.int32), vocab


# ------------------------------------------------------------------ arrays
@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Columns of equal length held in host memory."""

    columns: Mapping[str, np.ndarray]
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        cols = {k: np.asarray(v) for k, v in self.columns.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if not cols or len(set(lengths.values())) != 1:
            raise ValueError(f"columns must be non-empty and of equal length, got {lengths}")
        object.__setattr__(self, "columns", cols)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.columns.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.columns.items()}

    def select(self, indices: np.ndarray) -> ArraySource:
        return dataclasses.replace(self, columns=self.gather(np.asarray(indices, np.int64)))

    def with_columns(self, **columns: np.ndarray) -> ArraySource:
        return dataclasses.replace(self, columns={**self.columns, **columns})

    def without(self, *names: str) -> ArraySource:
        return dataclasses.replace(
            self, columns={k: v for k, v in self.columns.items() if k not in names}
        )


def from_arrays(
    columns: Mapping[str, Any], *, label: str | None = None, label_names: Sequence[str] | None = None
) -> ArraySource:
    """Dict of arrays -> :class:`ArraySource`; ``label`` names a column of class
    names (strings) to map to ids."""
    columns = dict(columns)
    vocab = None
    if label is not None:
        columns[label], vocab = encode_labels(columns[label], label_names)
    return ArraySource(columns, vocab)


# ------------------------------------------------------------ image folder
@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """``root/<class_name>/<file>`` images, read lazily.

    ``source[i]`` is ``{"image": HWC uint8 RGB array, "label": int32, "id": int64}``;
    class ids follow the sorted class-folder names, recorded as ``label_names``.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            image = np.asarray(im.convert("RGB"))
        return {"image": image, "label": self.labels[i], "id": self.ids[i]}

    def select(self, indices: np.ndarray) -> ImageFolderSource:
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(
            self, paths=tuple(self.paths[i] for i in indices),
            labels=self.labels[indices], ids=self.ids[indices],
        )


def read_image_folder(
    root: str | os.PathLike,
    *,
    label_names: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderSource:
    """Index ``root/<class_name>/*.<ext>`` (files sorted, so the order is stable)."""
    root = os.fspath(root)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if label_names is not None:
        extra = sorted(set(classes) - set(label_names))
        if extra:
            raise ValueError(f"{root}: class folders {extra} are not in label_names")
        classes = list(label_names)
    paths, labels = [], []
    exts = tuple(e.lower() for e in extensions)
    for c, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for fname in files:
            if fname.lower().endswith(exts):
                paths.append(os.path.join(folder, fname))
                labels.append(c)
    if not paths:
        raise ValueError(f"{root}: no images with extensions {list(exts)} in class folders")
    return ImageFolderSource(
        tuple(paths), np.asarray(labels, np.int32), tuple(classes),
        np.arange(len(paths), dtype=np.int64),
    )


# -------------------------------------------------------- image files
def read_image(path: str) -> np.ndarray:
    """An image file as uint8: ``(H, W)`` for greyscale files, ``(H, W, 3)`` RGB otherwise
    (greyscale stays one channel here; the image transform replicates it, see
    :func:`jaxfer.data.image.image_transform`)."""
    from PIL import Image

    with Image.open(path) as im:
        grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
        return np.asarray(im.convert("L" if grey else "RGB"))


@dataclasses.dataclass(frozen=True)
class ImageFileSource:
    """Image files read lazily, beside columns held in memory (``label``, ``id``, metadata).

    ``source[i]`` is ``{"image": read_image(paths[i]), **{column: value[i]}}``.
    ``select`` keeps paths and columns aligned, so a split or shard of it still
    knows each example's metadata (e.g. ELPV's cell type).
    """

    paths: tuple[str, ...]
    columns: Mapping[str, np.ndarray]
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        cols = {k: np.asarray(v) for k, v in self.columns.items()}
        bad = {k: len(v) for k, v in cols.items() if len(v) != len(self.paths)}
        if bad:
            raise ValueError(f"{len(self.paths)} image paths but column lengths {bad}")
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "columns", cols)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": read_image(self.paths[i]), **{k: v[i] for k, v in self.columns.items()}}

    def select(self, indices: np.ndarray) -> ImageFileSource:
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in indices),
                                   columns={k: v[indices] for k, v in self.columns.items()})


# --------------------------------------------------------------- batching
def gather(source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """``source.gather`` if it has one, else stack ``source[i]`` examples."""
    if hasattr(source, "gather"):
        return source.gather(np.asarray(indices, np.int64))
    return stack([source[int(i)] for i in indices])


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if not examples:
        raise ValueError("cannot stack zero examples")
    return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}

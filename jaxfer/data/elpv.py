"""ELPV: electroluminescence images of solar cells, defective or functional (``pip install elpv-dataset``).

2,624 greyscale 300x300 images of mono- and polycrystalline cells cut from 44
modules (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), each graded by experts
with a defect probability of 0, 1/3, 2/3 or 1. The package ships the PNGs and
``labels.csv`` (``images/cellNNNN.png  probability  mono|poly``).

:func:`read_elpv` gives an :class:`~jaxfer.data.sources.ImageFileSource` with
columns

* ``label``: 1 (``"defective"``) when ``probability >= threshold``, else 0
  (``"functional"``); the task of the quickstart (``threshold=0.5``: 821
  defective, 1,803 functional);
* ``probability`` (float32), ``cell_type`` (int32: 0 mono, 1 poly, names in
  :data:`CELL_TYPES`; numbers, so batches holding it go to devices as they are);
* ``id``: the row of ``labels.csv`` (stable across subsets and splits);
* ``stratum``: ``probability level x cell type`` (8 groups), which
  :func:`jaxfer.data.split_source` stratifies by, so every split keeps the
  proportions of each grade and cell type.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from jaxfer.data.sources import ImageFileSource

LABEL_NAMES = ("functional", "defective")
CELL_TYPES = ("mono", "poly")
PACKAGE = "elpv_dataset"


def default_root() -> str:
    """The ``data`` folder of the installed ``elpv-dataset`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ELPV is not installed: pip install elpv-dataset (or pass root=, the folder "
                                "holding labels.csv and images/)")
    return os.path.join(spec.submodule_search_locations[0], "data")


def read_elpv(root: str | None = None, *, threshold: float = 0.5, cell_type: str | None = None) -> ImageFileSource:
    """ELPV as a source (see the module docstring); ``cell_type`` keeps only ``"mono"`` or ``"poly"``.

    ``root``: a folder with ``labels.csv`` and the images it names (default: the
    installed package). Unknown cell types, missing files and probabilities
    outside [0, 1] are errors naming the row.
    """
    root = root or default_root()
    labels_csv = os.path.join(root, "labels.csv")
    if not os.path.isfile(labels_csv):
        raise FileNotFoundError(f"{root}: no labels.csv (is this the ELPV data folder?)")
    if cell_type not in (None, *CELL_TYPES):
        raise ValueError(f"cell_type {cell_type!r}; choose one of {CELL_TYPES} (or None for both)")
    paths, probs, types = [], [], []
    with open(labels_csv) as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 3 or parts[2] not in CELL_TYPES:
                raise ValueError(f"{labels_csv}:{row}: expected 'path probability mono|poly', got {line.strip()!r}")
            p = float(parts[1])
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{labels_csv}:{row}: defect probability {p} is outside [0, 1]")
            paths.append(os.path.join(root, parts[0]))
            probs.append(p)
            types.append(parts[2])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} images named in labels.csv are missing, e.g. {missing[0]}")
    probs_arr = np.asarray(probs, np.float32)
    type_ids = np.asarray([CELL_TYPES.index(t) for t in types], np.int32)
    level = np.rint(probs_arr * 3).astype(np.int64)  # 0, 1, 2, 3
    columns = {
        "label": (probs_arr >= threshold).astype(np.int32),
        "probability": probs_arr,
        "cell_type": type_ids,
        "id": np.arange(len(paths), dtype=np.int64),
        "stratum": level * len(CELL_TYPES) + type_ids,
    }
    source = ImageFileSource(tuple(paths), columns, LABEL_NAMES)
    if cell_type is not None:
        source = source.select(np.flatnonzero(type_ids == CELL_TYPES.index(cell_type)))
    return source

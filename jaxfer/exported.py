"""Run a model exported by :func:`jaxfer.export.stablehlo` with only ``jax`` and ``numpy``.

This file imports nothing from jaxfer: :func:`jaxfer.export.stablehlo` copies
it into every export folder, so a server that has jax (any backend the export
was lowered for) and the folder can run the model::

    import sys; sys.path.insert(0, "export_dir")
    import exported
    model = exported.load("export_dir")
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out["probs"]          # (batch, num_classes), float32; also out["logits"]
    model.label_names     # ("negative", "neutral", "positive")

The folder:

* ``model.stablehlo`` -- ``jax.export`` serialisation of
  ``f(variables, inputs) -> {"logits", "probs"}`` whose batch dimension is
  symbolic (any batch size runs; each new size compiles once);
* ``variables.npz`` -- the model's variables, flat: ``{"params/bert/...": array}``
  (dtypes numpy lacks, e.g. bfloat16, stored as raw bits);
* ``signature.json`` -- ``inputs`` (``{name: {"shape": [null, 48], "dtype":
  "int32"}}``, ``null`` the batch), ``outputs``, ``variables`` (``{path: dtype}``),
  ``label_names``, ``task``, ``platforms`` and ``preprocessing`` (how raw
  texts or images become the inputs; the tokenizer files sit beside it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

FUNCTION_FILE = "model.stablehlo"
VARIABLES_FILE = "variables.npz"
SIGNATURE_FILE = "signature.json"
NUMPY_DTYPES = frozenset(f"{k}{b}" for k, bits in (("int", (8, 16, 32, 64)), ("uint", (8, 16, 32, 64)),
                                                   ("float", (16, 32, 64))) for b in bits) | {"bool"}


def stored_array(x: np.ndarray) -> np.ndarray:
    """An array ``np.savez`` can keep: dtypes numpy lacks become unsigned ints of the same width."""
    x = np.asarray(x)
    if x.dtype.name in NUMPY_DTYPES:
        return x
    return x.view(np.dtype(f"uint{x.dtype.itemsize * 8}"))


def restored_array(x: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of :func:`stored_array`, given the original dtype's name."""
    want = jnp.dtype(dtype)
    return x if x.dtype == want else x.view(want)


class Exported:
    """An exported model: ``model(**inputs) -> {"logits": ..., "probs": ...}`` (numpy)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        with open(os.path.join(self.directory, SIGNATURE_FILE)) as f:
            self.signature: dict[str, Any] = json.load(f)
        with open(os.path.join(self.directory, FUNCTION_FILE), "rb") as f:
            self._exported = jax_export.deserialize(bytearray(f.read()))
        backend = jax.default_backend()
        if backend not in self._exported.platforms:
            raise RuntimeError(f"{self.directory} was exported for {list(self._exported.platforms)}, "
                               f"this process runs on {backend!r}: export again with that platform")
        dtypes = self.signature["variables"]
        with np.load(os.path.join(self.directory, VARIABLES_FILE)) as raw:
            if set(raw.files) != set(dtypes):
                raise ValueError(f"{VARIABLES_FILE} and {SIGNATURE_FILE} disagree on the variables: "
                                 f"{sorted(set(raw.files) ^ set(dtypes))[:5]}")
            self.variables = {k: jax.device_put(restored_array(raw[k], dtypes[k])) for k in raw.files}
        self._call = jax.jit(self._exported.call)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.signature["inputs"])

    @property
    def label_names(self) -> tuple[str, ...] | None:
        names = self.signature.get("label_names")
        return tuple(names) if names else None

    def check_inputs(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Inputs as arrays of the exported dtypes; an error names a missing, extra or mis-shaped one."""
        spec = self.signature["inputs"]
        missing, extra = set(spec) - set(inputs), set(inputs) - set(spec)
        if missing or extra:
            raise ValueError(f"inputs must be exactly {sorted(spec)}; missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        out, batch = {}, None
        for name, s in spec.items():
            x = np.asarray(inputs[name])
            want = s["shape"]
            if x.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, x.shape)):
                shown = ["batch" if w is None else w for w in want]
                raise ValueError(f"input {name!r} has shape {x.shape}; the export takes {shown}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"inputs disagree on the batch size: {name!r} has {x.shape[0]}, "
                                 f"others {batch}")
            batch = x.shape[0]
            out[name] = x.astype(s["dtype"], copy=False)
        return out

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        outputs = self._call(self.variables, self.check_inputs(inputs))
        return {k: np.asarray(v) for k, v in outputs.items()}


def load(directory: str | os.PathLike) -> Exported:
    """The exported model in ``directory`` (see the module docstring)."""
    return Exported(directory)

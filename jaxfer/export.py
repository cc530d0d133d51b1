"""Serving export: an inference function and its variables, serialised with ``jax.export``.

    jaxfer.export.stablehlo("export_dir", jf.model_apply(model), variables,
                            inputs={"pixel_values": np.zeros((1, 3, 224, 224), np.float32)},
                            label_names=("cat", "dog"))

writes a folder that :mod:`jaxfer.exported` (copied into it) runs with only
jax and numpy, no jaxfer and no model code. The function exported is

    f(variables, inputs) = {"logits": logits, "probs": probs}

with ``outputs, _ = apply_fn(variables, inputs, train=False)`` (the step's
``apply_fn`` contract), ``logits = outputs["logits"]`` and ``probs`` its
softmax (``classification``), sigmoid (``multi_label``) or nothing
(``regression``). Every input's first dimension is one symbolic ``batch``; the
other dimensions are those of the example ``inputs`` given. The function is
lowered for each of ``platforms`` (default: this process's backend; lowering
for ``("cpu", "cuda", "tpu")`` works from any machine).

:func:`onnx` converts the same function with ``jax2onnx`` (``pip install
'jaxfer[onnx]'``), the parameters baked in as constants; :func:`saved_model`
writes a TensorFlow SavedModel with ``orbax-export`` (``pip install
'jaxfer[savedmodel]'``, which brings TensorFlow).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from jaxfer import exported as runtime
from jaxfer import tasks, tree

RUNTIME_FILE = "exported.py"


def flat_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"params": tree, "batch_stats": tree}`` -> ``{"params/a/b": array, ...}`` on host."""
    return {f"{c}/{p}": np.asarray(jax.device_get(v))
            for c, vs in variables.items() for p, v in tree.flatten(vs).items()}


def nested_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_variables`."""
    return tree.unflatten(flat)


def inference_fn(apply_fn, task: str = "classification"):
    """``f(flat_variables, inputs) -> {"logits", "probs"}`` (see the module docstring)."""
    tasks.check_kind(task)

    def f(flat, inputs):
        outputs, _ = apply_fn(nested_variables(flat), inputs, train=False)
        logits = outputs["logits"].astype(jnp.float32)
        out = {"logits": logits}
        if task == "classification":
            out["probs"] = jax.nn.softmax(logits, axis=-1)
        elif task == "multi_label":
            out["probs"] = jax.nn.sigmoid(logits)
        return out

    return f


def _spec(inputs: Mapping[str, Any], batch) -> dict[str, jax.ShapeDtypeStruct]:
    out = {}
    for name, x in inputs.items():
        shape, dtype = np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
        if len(shape) == 0:
            raise ValueError(f"input {name!r} has no batch dimension (a scalar)")
        out[name] = jax.ShapeDtypeStruct((batch,) + tuple(shape[1:]), dtype)
    return out


def stablehlo(directory: str | os.PathLike, apply_fn, variables: Mapping[str, Any],
              inputs: Mapping[str, Any], *, task: str = "classification",
              label_names: Sequence[str] | None = None, preprocessing: Mapping[str, Any] | None = None,
              platforms: Sequence[str] | None = None, files: Sequence[str | os.PathLike] = ()) -> str:
    """Export ``apply_fn`` with ``variables`` to ``directory`` (created; must be empty or new).

    Args:
      apply_fn: ``apply_fn(variables, batch, *, train, rng=None) -> (outputs, state)``
        (``jf.model_apply(model)``); ``outputs["logits"]`` is exported.
      variables: ``{"params": ..., "batch_stats": ...}`` (``{"params": state.params,
        **state.model_state}``).
      inputs: example inputs, ``{name: array}`` with a leading batch dimension;
        only their names, dtypes and non-batch dimensions are used.
      label_names: one per output column, kept in ``signature.json``.
      preprocessing: how raw data becomes ``inputs`` (kept in ``signature.json``,
        read by :mod:`jaxfer.inference`).
      files: copied into the folder (e.g. the tokenizer's files).
    Returns the folder's path.
    """
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"export folder {directory!r} is not empty")
    os.makedirs(directory, exist_ok=True)
    platforms = tuple(platforms or (jax.default_backend(),))
    flat = flat_variables(variables)
    (batch,) = jax_export.symbolic_shape("batch")
    in_spec = _spec(inputs, batch)
    var_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    fn = jax.jit(inference_fn(apply_fn, task))
    exp = jax_export.export(fn, platforms=platforms)(var_spec, in_spec)
    out_shapes = jax.eval_shape(fn, var_spec, in_spec)
    if label_names is not None and len(label_names) != out_shapes["logits"].shape[-1]:
        raise ValueError(f"{len(label_names)} label names for {out_shapes['logits'].shape[-1]} outputs")

    with open(os.path.join(directory, runtime.FUNCTION_FILE), "wb") as f:
        f.write(exp.serialize())
    np.savez(os.path.join(directory, runtime.VARIABLES_FILE),
             **{k: runtime.stored_array(v) for k, v in flat.items()})
    signature = {
        "inputs": {k: {"shape": [None] + list(s.shape[1:]), "dtype": np.dtype(s.dtype).name}
                   for k, s in in_spec.items()},
        "outputs": {k: {"shape": [None] + list(s.shape[1:]), "dtype": np.dtype(s.dtype).name}
                    for k, s in out_shapes.items()},
        "variables": {k: v.dtype.name for k, v in flat.items()},
        "label_names": [str(n) for n in label_names] if label_names is not None else None,
        "task": task,
        "platforms": list(platforms),
        "preprocessing": dict(preprocessing or {}),
        "jax_version": jax.__version__,
    }
    with open(os.path.join(directory, runtime.SIGNATURE_FILE), "w") as f:
        json.dump(signature, f, indent=1)
    shutil.copy(runtime.__file__, os.path.join(directory, RUNTIME_FILE))
    for path in files:
        shutil.copy(path, directory)
    return directory


def onnx(path: str | os.PathLike, apply_fn, variables: Mapping[str, Any], inputs: Mapping[str, Any], *,
         task: str = "classification", opset: int = 17) -> str:
    """Convert the inference function to an ONNX file with ``jax2onnx`` (batch dim symbolic).

    The variables become constants of the graph; inputs keep their names, outputs are
    ``logits`` and (for classifiers) ``probs``.
    """
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError("ONNX export needs jax2onnx: pip install 'jaxfer[onnx]'") from e
    flat = {k: jnp.asarray(v) for k, v in flat_variables(variables).items()}
    f = inference_fn(apply_fn, task)
    names = list(inputs)
    outputs = ["logits"] + (["probs"] if task != "regression" else [])

    def g(*xs):
        out = f(flat, dict(zip(names, xs)))
        return tuple(out[k] for k in outputs)

    specs = [jax.ShapeDtypeStruct(("B",) + tuple(np.shape(inputs[k])[1:]), np.asarray(inputs[k]).dtype)
             for k in names]
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # one warning per constant otherwise
    path = os.fspath(path)
    to_onnx(g, specs, model_name="jaxfer", opset=opset, input_names=names, output_names=outputs,
            return_mode="file", output_path=path)
    return path


def saved_model(directory: str | os.PathLike, apply_fn, variables: Mapping[str, Any],
                inputs: Mapping[str, Any], *, task: str = "classification") -> str:
    """A TensorFlow SavedModel of the inference function (``orbax-export``, through jax2tf).

    Signature ``serving_default``: the named inputs (batch dimension ``None``) ->
    ``logits`` and (for classifiers) ``probs``. The batch dimension is given to
    jax2tf as one symbolic ``b`` (orbax-export's default ``None`` does not parse
    with jax >= 0.10).
    """
    try:
        import tensorflow as tf
        from orbax.export import ExportManager, JaxModule, ServingConfig
    except ImportError as e:
        raise ImportError("SavedModel export needs TensorFlow and orbax-export: "
                          "pip install 'jaxfer[savedmodel]'") from e
    f = inference_fn(apply_fn, task)
    names = list(inputs)
    poly = {k: "(b, " + ", ".join(map(str, np.shape(inputs[k])[1:])) + ")" for k in names}
    module = JaxModule(flat_variables(variables), f, input_polymorphic_shape=poly)
    signature = [{k: tf.TensorSpec([None, *np.shape(inputs[k])[1:]], tf.as_dtype(np.asarray(inputs[k]).dtype),
                                   name=k) for k in names}]
    directory = os.fspath(directory)
    ExportManager(module, [ServingConfig("serving_default", input_signature=signature)]).save(directory)
    return directory

"""Checkpoint files -> numpy arrays, one reader per format.

Two kinds of result (:class:`Checkpoint`):

* ``state_dict``: ``{torch name: np.ndarray}`` from ``model.safetensors`` (single or
  sharded with ``model.safetensors.index.json``), ``pytorch_model.bin`` (single
  or sharded) and ``.pth``/``.pt``, or ``{"<layer>/<weight>": np.ndarray}`` from Keras
  ``.h5``; these still need a family key map;
* ``variables``: ``{collection: {our/path: np.ndarray}}`` from ``flax_model.msgpack``,
  ``.npz`` (flat path keys) and orbax checkpoint directories: already our layout.

A file that cannot be read raises :class:`WeightsError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from jaxfer import tree
from jaxfer.errors import WeightsError

COLLECTIONS = ("params", "batch_stats")
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")


@dataclasses.dataclass
class Checkpoint:
    format: str  # "safetensors" | "pytorch" | "msgpack" | "npz" | "orbax" | "keras"
    files: list[Path]
    state_dict: dict[str, np.ndarray] | None = None
    variables: dict[str, dict[str, np.ndarray]] | None = None


# ------------------------------------------------------------------ discovery
def _is_orbax(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ORBAX_MARKERS)


def find(path: str | Path) -> tuple[str, list[Path]]:
    """The weights format and files at ``path`` (a file, or a model directory)."""
    path = Path(path)
    if path.is_file():
        return _format_of_file(path), _shards(path)
    if _is_orbax(path):
        return "orbax", [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    for name in ("model.safetensors.index.json", "model.safetensors", "flax_model.msgpack",
                 "pytorch_model.bin.index.json", "pytorch_model.bin", "model.npz", "params.npz"):
        if (path / name).exists():
            return find(path / name)
    for sub in ("orbax", "checkpoint", "params"):
        if _is_orbax(path / sub):
            return "orbax", [path / sub]
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.npz"))
    found = found or sorted(path.glob("*.pth")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.h5"))  # a lone file
    if len(found) == 1:
        return find(found[0])
    listing = ", ".join(sorted(p.name for p in path.iterdir())) or "empty"
    raise WeightsError(f"{path}: no weights found (looked for safetensors, flax_model.msgpack, "
                       f"pytorch_model.bin, .npz, orbax, a single .pth); directory holds: {listing}")


def _format_of_file(path: Path) -> str:
    name = path.name
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return "safetensors"
    if name.endswith(".bin") or name.endswith(".bin.index.json") or name.endswith((".pt", ".pth")):
        return "pytorch"
    if name.endswith(".msgpack"):
        return "msgpack"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".h5", ".hdf5")):
        return "keras"
    raise WeightsError(f"{path}: unknown checkpoint format")


def _shards(path: Path) -> list[Path]:
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise WeightsError(f"{path}: not a valid shard index (no 'weight_map' of tensor name -> "
                           "shard file name)")
    files = [shard_path(path, name) for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"{path}: shard files missing: {', '.join(missing[:10])}")
    return files


def shard_path(index: Path, name: str) -> Path:
    """The shard ``name`` of an index, confined to the index's folder.

    A shard is named by a relative path below the folder; an absolute path, a
    drive, or a ``..`` step is refused (:class:`WeightsError`), so an index can
    never make jaxfer open a file elsewhere. (Symlinks *inside* the folder are its
    owner's: the Hugging Face cache links every file to its blob store.)
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if (not name or pure.is_absolute() or PureWindowsPath(name).drive or "\0" in name
            or any(part == ".." for part in pure.parts)):
        raise WeightsError(f"{index}: shard {name!r} is outside the checkpoint folder "
                           f"{index.parent}; an index may only name files inside it")
    return index.parent.joinpath(*pure.parts)


# -------------------------------------------------------------------- readers
def read(path: str | Path) -> Checkpoint:
    """Read the weights at ``path`` (file or directory) into numpy.

    Whatever the files hold, the result is numeric arrays by string name, or a
    :class:`WeightsError` naming the file (the tests fuzz every format).
    """
    fmt, files = find(path)
    try:
        if fmt == "safetensors":
            ckpt = Checkpoint(fmt, files, state_dict=_merge(read_safetensors(f) for f in files))
        elif fmt == "pytorch":
            ckpt = Checkpoint(fmt, files, state_dict=_merge(read_torch(f) for f in files))
        elif fmt == "msgpack":
            ckpt = Checkpoint(fmt, files, variables=read_msgpack(files[0]))
        elif fmt == "npz":
            ckpt = Checkpoint(fmt, files, variables=read_npz(files[0]))
        elif fmt == "keras":
            ckpt = Checkpoint(fmt, files, state_dict=read_keras_h5(files[0]))
        else:
            ckpt = Checkpoint(fmt, files, variables=read_orbax(files[0]))
    except WeightsError:
        raise
    except Exception as e:  # a malformed file can trip any step after its format's reader
        raise WeightsError(f"{files[0]}: not a readable {fmt} checkpoint ({type(e).__name__}: {e})") from e
    flat = ckpt.state_dict if ckpt.state_dict is not None else \
        {f"{c}/{p}": v for c, vs in ckpt.variables.items() for p, v in vs.items()}
    for name, value in flat.items():
        _check_array(files[0], name, value)
    return ckpt


def _check_array(file: Path, name: Any, value: Any) -> None:
    import jax.numpy as jnp

    if not isinstance(name, str) or not isinstance(value, np.ndarray) or not (
            jnp.issubdtype(value.dtype, jnp.number) or value.dtype == np.bool_):
        raise WeightsError(f"{file}: entry {name!r} is not a numeric array "
                           f"({type(value).__name__} {getattr(value, 'dtype', '')})")


def _merge(parts) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for part in parts:
        out.update(part)
    return out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                try:
                    out[key] = f.get_tensor(key)
                except TypeError:  # bfloat16 & co.: numpy has no such dtype, ml_dtypes does
                    with safe_open(str(path), framework="flax") as g:
                        out[key] = np.asarray(g.get_tensor(key))
        return out
    except Exception as e:  # safetensors raises its own (Rust) error types
        raise WeightsError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e


def read_torch(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict (``.bin``/``.pt``/``.pth``), unpickled safely: ``torch.load(...,
    weights_only=True)`` rebuilds tensors and containers only, never arbitrary objects."""
    try:
        import torch  # only when a PyTorch checkpoint is actually present
    except ImportError:
        raise WeightsError(f"{path}: a PyTorch checkpoint; reading it safely needs torch "
                              "(pip install 'jaxfer[torch]'), or convert it to safetensors") from None

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path}: expected a state_dict mapping, got {type(sd).__name__}")
    out = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[key] = t.numpy()
    return out


# Keras 3 ``.weights.h5`` stores variables by index per layer class; their names, in order.
_KERAS_VARS = {"conv2d": ("kernel", "bias"), "dense": ("kernel", "bias"), "depthwise_conv2d": ("kernel", "bias"),
               "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance")}


def read_keras_h5(path: Path) -> dict[str, np.ndarray]:
    """Keras weights in HDF5 -> ``{"<layer>/<weight>": array}`` (``block1_conv1/kernel``,
    ``batch_normalization_3/moving_mean``), in the file's layer order.

    Two layouts: the one Keras applications ship and ``model.save("x.h5")`` writes
    (``layer_names`` / ``weight_names`` attributes, at the root or under
    ``model_weights``), and Keras 3's ``model.save_weights("x.weights.h5")``
    (``layers/<class>/vars/<i>``, names by layer class: conv/dense ``kernel, bias``;
    batch norm ``gamma, beta, moving_mean, moving_variance``, without ``gamma``
    when it has three: ``scale=False``). Kernels stay in Keras's own layout (HWIO,
    ``(in, out)``), which a family's key map knows.
    """
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path}: a Keras .h5 file; reading it needs h5py (pip install 'jaxfer[keras]')") from None
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            out: dict[str, np.ndarray] = {}
            if "layer_names" in group.attrs:
                for layer in _names(group.attrs["layer_names"]):
                    for weight in _names(group[layer].attrs.get("weight_names", [])):
                        key = weight.split(":")[0]
                        out[key if "/" in key else f"{layer}/{key}"] = np.asarray(group[layer][weight])
                return out
            if "layers" in f:
                for cls_name, layer in f["layers"].items():
                    if "vars" not in layer or not len(layer["vars"]):
                        continue
                    name = layer["vars"].attrs.get("name", cls_name)
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    kind = cls_name.rstrip("0123456789").rstrip("_")
                    n = len(layer["vars"])
                    names = _KERAS_VARS.get(kind)
                    if names is None:
                        raise WeightsError(f"{path}: layer {name!r} of class {kind!r}: variable names unknown")
                    names = names[1:] if kind == "batch_normalization" and n == 3 else names[:n]
                    for i, var in enumerate(names):
                        out[f"{name}/{var}"] = np.asarray(layer["vars"][str(i)])
                return out
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"{path}: not a readable Keras HDF5 file (corrupt or truncated?): {e}") from e
    raise WeightsError(f"{path}: an HDF5 file without Keras weights (no layer_names, no layers/)")


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _as_variables(tree_like: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Nested tree -> ``{collection: {path: array}}``; a bare params tree becomes ``params``."""
    _check_keys(tree_like)
    if "params" in tree_like and set(tree_like) <= set(COLLECTIONS) | {"params"}:
        return {c: {p: np.asarray(v) for p, v in tree.flatten(t).items()} for c, t in tree_like.items()}
    return {"params": {p: np.asarray(v) for p, v in tree.flatten(dict(tree_like)).items()}}


def _check_keys(node: Any, where: str = "") -> None:
    """Every key of a nested mapping is a string (what a params tree's paths are made of)."""
    if isinstance(node, Mapping):
        for key, child in node.items():
            if not isinstance(key, str):
                raise WeightsError(f"key {key!r} under {where or 'the root'!r} is not a string")
            _check_keys(child, f"{where}/{key}" if where else key)


def read_msgpack(path: Path) -> dict[str, dict[str, np.ndarray]]:
    from flax import serialization

    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise WeightsError(f"{path}: not a readable Flax msgpack file (corrupt or truncated?): {e}") from e
    if not isinstance(restored, Mapping):
        raise WeightsError(f"{path}: expected a params mapping, got {type(restored).__name__}")
    return _as_variables(restored)


def read_npz(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Flat keys ``collection/our/path`` (as :func:`write_npz` writes) or bare param paths."""
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception as e:
        raise WeightsError(f"{path}: not a readable .npz file (corrupt or truncated?): {e}") from e
    if flat and all(k.split("/", 1)[0] in COLLECTIONS and "/" in k for k in flat):
        out: dict[str, dict[str, np.ndarray]] = {}
        for k, v in flat.items():
            coll, p = k.split("/", 1)
            out.setdefault(coll, {})[p] = v
        return out
    return {"params": flat}


def read_orbax(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(str(Path(path).absolute()))
    except Exception as e:
        raise WeightsError(f"{path}: not a readable orbax checkpoint: {e}") from e
    return _as_variables(restored)


# -------------------------------------------------------------------- writers
def write_npz(path: str | Path, variables: Mapping[str, Any]) -> Path:
    """Save ``{collection: tree}`` (or a bare params tree) as flat ``collection/path`` keys."""
    flat = {f"{c}/{p}": np.asarray(v) for c, vs in _as_variables(variables).items() for p, v in vs.items()}
    path = Path(path)
    np.savez(path, **flat)
    return path if path.suffix == ".npz" else path.with_suffix(".npz")


def write_msgpack(path: str | Path, variables: Mapping[str, Any]) -> Path:
    """Save a params tree (or ``{collection: tree}``) like HF's ``flax_model.msgpack``."""
    from flax import serialization

    path = Path(path)
    path.write_bytes(serialization.msgpack_serialize(jax_to_numpy(variables)))
    return path


def jax_to_numpy(t: Any) -> Any:
    import jax

    return jax.tree_util.tree_map(np.asarray, t)

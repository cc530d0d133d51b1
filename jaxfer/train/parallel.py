"""Scale by sharding: meshes, parameter/batch shardings, and the pmap strategy.

The same train step runs on one CPU, N devices and N hosts. A ``Mesh`` has two
axes, ``data`` (batch parallel) and ``fsdp`` (parameters and optimizer state
split across devices, gathered by XLA where a computation needs them). The batch
is split over both axes — every device sees different examples — while each
parameter leaf is either replicated or split along one dimension over ``fsdp``.

Which leaves are split is decided by rules over parameter paths, in the same
pattern language as masks (``jaxfer.tree``), first match wins::

    rules = [("**/embedding", "replicate"), ("**", "fsdp")]

``"fsdp"`` shards the largest dimension divisible by the ``fsdp`` axis size for
leaves of at least ``min_fsdp_size`` elements, and replicates the rest. A rule
value may also be an explicit ``PartitionSpec``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxfer import tree

PyTree = Any
DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device
DEFAULT_RULES = (("**", "fsdp"),)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh; one axis may be ``-1`` meaning "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or n % known:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not divide the {n} available devices")
    sizes = [n // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} uses {math.prod(sizes)} devices, "
                         f"but {n} are available; use -1 for one axis to take the rest")
    return Mesh(np.asarray(devices).reshape(sizes), (DATA, FSDP))


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    # the largest dimension that divides evenly; ties go to the last (contiguous) one
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP
    return P(*spec)


def param_specs(params: PyTree, mesh: Mesh, rules=DEFAULT_RULES, *, min_fsdp_size: int = 2**14) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``params`` (which may be abstract), by path rules."""
    compiled = [(tree.compile_pattern(p), v) for p, v in rules]
    used = [False] * len(compiled)
    fsdp_size = mesh.shape[FSDP]

    def spec_for(path: str, leaf) -> P:
        for i, (rx, value) in enumerate(compiled):
            if rx.fullmatch(path):
                used[i] = True
                shape = tuple(np.shape(leaf))
                if isinstance(value, P):
                    _check_divisible(path, shape, value, mesh)
                    return value
                if value == "fsdp":
                    return _fsdp_spec(shape, fsdp_size, min_fsdp_size)
                if value in ("replicate", None):
                    return P()
                raise ValueError(f"sharding rule value {value!r} for {path!r}: use 'fsdp', "
                                 "'replicate' or a PartitionSpec")
        raise ValueError(f"no sharding rule matches parameter {path!r}; end the rules with ('**', ...)")

    specs = tree.map_with_path(spec_for, params)
    for (pattern, _), hit in zip(rules, used):
        if not hit:
            raise tree.NoMatchError(pattern, tree.paths(params), what="sharding rule")
    return specs


def _check_divisible(path: str, shape, spec: P, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % size:
            raise ValueError(f"parameter {path!r} of shape {shape}: dimension {dim} does not divide "
                             f"over mesh axes {axes} of size {size}")


def shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: PyTree, mesh: Mesh, rules=DEFAULT_RULES, *, min_fsdp_size: int = 2**14) -> PyTree:
    """Shardings for a whole ``TrainState`` (may be abstract, from ``jax.eval_shape``).

    Parameters follow ``rules``; optimizer-state leaves that mirror a parameter
    (Adam's ``mu``/``nu``) follow the same spec, matched by shape and path
    suffix; every other leaf (step counters, RNG, scalars) is replicated.
    """
    pspecs = param_specs(state.params, mesh, rules, min_fsdp_size=min_fsdp_size)
    by_path = {path: (np.shape(leaf), spec) for (path, leaf), spec in zip(
        tree.flatten(state.params).items(), jax.tree_util.tree_leaves(pspecs, is_leaf=lambda x: isinstance(x, P)))}

    def opt_spec(path: str, leaf) -> P:
        shape = np.shape(leaf)
        # optax state paths end with the parameter's own path (e.g. "0/mu/encoder/.../kernel")
        for ppath, (pshape, spec) in by_path.items():
            if shape == pshape and (path == ppath or path.endswith("/" + ppath)):
                return spec
        return P()

    opt_specs = tree.map_with_path(opt_spec, state.opt_state)
    specs = state.replace(
        step=P(), rng=P(), params=pspecs, opt_state=opt_specs,
        model_state=jax.tree_util.tree_map(lambda _: P(), state.model_state),
    )
    return shardings(specs, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA] * mesh.shape[FSDP]
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} does not divide over the {n} devices of "
                         f"the mesh (data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); "
                         f"use a multiple of {n}")


def place(tree_: PyTree, shardings_: PyTree) -> PyTree:
    """Put each leaf on its sharding (single process: ``jax.device_put``)."""
    return jax.device_put(tree_, shardings_)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A host-local batch -> a global array split over the mesh.

    On several processes each one passes only its own examples; the global
    batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    first = next(iter(batch.values()))
    check_batch_size(np.shape(first)[0] * jax.process_count(), mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

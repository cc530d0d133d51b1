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
from jaxfer.errors import ConfigError

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


class ShardingRules:
    """Path rules -> a ``PartitionSpec`` for one leaf, given its path and shape.

    Used leaf by leaf when loading straight into the sharded layout, and over a
    whole tree by :func:`param_specs`.
    """

    def __init__(self, mesh: Mesh, rules=DEFAULT_RULES, *, min_fsdp_size: int = 2**14):
        self.mesh, self.rules, self.min_fsdp_size = mesh, tuple(rules), min_fsdp_size
        self._compiled = [(tree.compile_pattern(p), v) for p, v in self.rules]
        self.used = [False] * len(self._compiled)

    def spec(self, path: str, shape: tuple[int, ...]) -> P:
        for i, (rx, value) in enumerate(self._compiled):
            if rx.fullmatch(path):
                self.used[i] = True
                if isinstance(value, P):
                    _check_divisible(path, shape, value, self.mesh)
                    return value
                if value == "fsdp":
                    return _fsdp_spec(shape, self.mesh.shape[FSDP], self.min_fsdp_size)
                if value in ("replicate", None):
                    return P()
                raise ValueError(f"sharding rule value {value!r} for {path!r}: use 'fsdp', "
                                 "'replicate' or a PartitionSpec")
        raise ValueError(f"no sharding rule matches parameter {path!r}; end the rules with ('**', ...)")

    def sharding(self, path: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(path, tuple(shape)))

    def check_all_used(self, paths) -> None:
        for (pattern, _), hit in zip(self.rules, self.used):
            if not hit:
                raise tree.NoMatchError(pattern, paths, what="sharding rule")


def param_specs(params: PyTree, mesh: Mesh, rules=DEFAULT_RULES, *, min_fsdp_size: int = 2**14) -> PyTree:
    """A ``PartitionSpec`` per leaf of ``params`` (which may be abstract), by path rules."""
    engine = ShardingRules(mesh, rules, min_fsdp_size=min_fsdp_size)
    specs = tree.map_with_path(lambda path, leaf: engine.spec(path, tuple(np.shape(leaf))), params)
    engine.check_all_used(tree.paths(params))
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
        raise ConfigError(f"global batch size {global_batch} does not divide over the {n} devices of "
                         f"the mesh (data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); "
                         f"use a multiple of {n}")


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


# ------------------------------------------------------------------ strategies
class Strategy:
    """How a run places its state and batches and compiles its steps.

    ``JitStrategy`` (the default) is one ``jax.jit`` over a ``(data, fsdp)``
    mesh; ``PmapStrategy`` is the classic ``jax.pmap`` with replicated state.
    Both give the same parameters after the same steps (tests/test_parallel.py).
    """

    @staticmethod
    def from_config(mesh_cfg, mesh: Mesh) -> "Strategy":
        kind = mesh_cfg.get("strategy", "jit")
        rules = tuple(tuple(r) for r in (mesh_cfg.get("rules") or DEFAULT_RULES))
        if kind == "jit":
            return JitStrategy(mesh, rules, min_fsdp_size=mesh_cfg.get("min_fsdp_size", 2**14))
        if kind == "pmap":
            return PmapStrategy()
        raise ValueError(f"unknown mesh.strategy {kind!r}; choose 'jit' or 'pmap'")


class JitStrategy(Strategy):
    def __init__(self, mesh: Mesh, rules=DEFAULT_RULES, *, min_fsdp_size: int = 2**14):
        self.mesh, self.rules, self.min_fsdp_size = mesh, rules, min_fsdp_size
        self.state_sharding = None

    def param_placer(self):
        """``place(collection, path, value, dtype)`` for ``jaxfer.load``: each
        converted leaf goes straight to its shard, never whole onto one device."""
        engine = ShardingRules(self.mesh, self.rules, min_fsdp_size=self.min_fsdp_size)
        replicated = NamedSharding(self.mesh, P())

        def place(collection: str, path: str, value, dtype):
            value = np.asarray(value, dtype)
            sharding = engine.sharding(path, value.shape) if collection == "params" else replicated
            return _from_host(value, sharding)

        return place

    def place_state(self, state):
        self.state_sharding = state_shardings(state, self.mesh, self.rules,
                                              min_fsdp_size=self.min_fsdp_size)
        if jax.process_count() == 1:
            return jax.device_put(state, self.state_sharding)
        state = jax.tree_util.tree_map(_global_from_host, state, self.state_sharding)
        # leaves already global (loaded sharded) may sit on another layout: reshard
        return jax.jit(lambda s: s, out_shardings=self.state_sharding)(state)

    def train_step(self, apply_fn, loss_fn, tx, trainable, **kw):
        from jaxfer.train import step as step_lib

        return step_lib.make_train_step(apply_fn, loss_fn, tx, trainable,
                                        state_sharding=self.state_sharding,
                                        batch_sharding=batch_sharding(self.mesh), **kw)

    def eval_step(self, apply_fn, loss_fn, **kw):
        from jaxfer.train import step as step_lib

        return step_lib.make_eval_step(apply_fn, loss_fn, **kw)

    def shard_batch(self, batch):
        return shard_batch(batch, self.mesh)

    def wrap_checkpointer(self, checkpointer):
        return checkpointer


def _from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array on ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _global_from_host(x, sharding):
    """A leaf every process holds in full -> a global array on ``sharding``."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = _from_host(np.asarray(jax.random.key_data(x)), NamedSharding(sharding.mesh, P()))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return _from_host(np.asarray(x), sharding)
    return x


AXIS = "batch"


class PmapStrategy(Strategy):
    """Replicated state, ``jax.pmap`` steps, gradients summed with ``lax.psum``.

    For code that expects pmap; single process only (use ``strategy="jit"`` on
    several hosts). Checkpoints hold one copy of the state, so a pmap run can be
    resumed by a jit run and back.
    """

    def __init__(self, devices: Sequence[jax.Device] | None = None):
        if jax.process_count() > 1:
            raise NotImplementedError("strategy='pmap' runs on one process; use strategy='jit' "
                                      "(the default) for multi-host runs")
        self.devices = list(devices or jax.local_devices())
        self.n = len(self.devices)

    def param_placer(self):
        return None

    def place_state(self, state):
        return replicate(state, self.devices)

    def train_step(self, apply_fn, loss_fn, tx, trainable, **kw):
        from jaxfer.train import step as step_lib

        inner = step_lib.make_train_step(apply_fn, loss_fn, tx, trainable, axis_name=AXIS,
                                         jit=False, **kw)
        pstep = jax.pmap(inner, axis_name=AXIS, devices=self.devices, donate_argnums=0)

        def step(state, batch):
            state, metrics = pstep(state, batch)
            return state, jax.tree_util.tree_map(lambda m: m[0], metrics)

        return step

    def eval_step(self, apply_fn, loss_fn, **kw):
        from jaxfer.train import step as step_lib

        pstep = jax.pmap(step_lib.make_eval_step(apply_fn, loss_fn, jit=False, **kw),
                         axis_name=AXIS, devices=self.devices)

        def step(state, batch):
            out = pstep(state, batch)
            return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)

        return step

    def shard_batch(self, batch):
        """``[B, ...]`` -> ``[devices, B / devices, ...]``."""
        first = np.shape(next(iter(batch.values())))[0]
        if first % self.n:
            raise ValueError(f"batch size {first} does not divide over the {self.n} devices of "
                             f"the pmap strategy; use a multiple of {self.n}")
        return {k: np.reshape(v, (self.n, first // self.n, *np.shape(v)[1:])) for k, v in batch.items()}

    def wrap_checkpointer(self, checkpointer):
        return _UnreplicatedCheckpointer(checkpointer, self.devices)


def replicate(tree_: PyTree, devices: Sequence[jax.Device]) -> PyTree:
    """One copy per device, stacked on a new leading axis (what pmap takes)."""
    devices = list(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P(AXIS))

    def stack(x):
        x = jax.numpy.asarray(x)
        return jax.device_put(jax.numpy.broadcast_to(x[None], (len(devices), *x.shape)), sharding)

    return jax.tree_util.tree_map(stack, tree_)


def unreplicate(tree_: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x[0], tree_)


class _UnreplicatedCheckpointer:
    """Saves one copy of a replicated (pmap) state; restores and re-replicates."""

    def __init__(self, inner, devices):
        self.inner, self.devices = inner, devices

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, step, state, **kw):
        return self.inner.save(step, unreplicate(state), **kw)

    def restore(self, template, *args, **kw):
        state, *rest = self.inner.restore(unreplicate(template), *args, **kw)
        return (replicate(state, self.devices), *rest)

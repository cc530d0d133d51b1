"""Orbax checkpoints of a :class:`~jaxfer.train.state.TrainState` and everything a
resumed run needs.

Layout: ``workdir/checkpoints/<step>/`` holds three orbax items:

* ``state`` -- the arrays: ``step``, ``rng`` (typed keys are stored as
  ``jax.random.key_data`` and re-wrapped on restore), ``params`` (all of them, or
  only the trainable ones, see below), ``opt_state`` and ``model_state``. Leaves
  are stored as nested dicts keyed by their :mod:`jaxfer.tree` paths, so any
  pytree (optax named tuples included) round-trips and mismatches are reported by
  path.
* ``meta`` -- JSON: the manifest (path -> shape, dtype), the PRNG implementation,
  the data iterator state and the eval metrics of that step.
* ``config`` -- JSON, when a config is given (orbax writes JSON on the primary
  process only).

Commits are atomic: orbax writes into a temporary directory and renames it when
every item is complete, so a killed run leaves either a whole checkpoint or no
checkpoint at that step.

Retention (done here, not with orbax's ``max_to_keep``/``best_fn``, which cannot
keep "the latest k and the best m" at once): after each save has finished, the
``keep`` most recent steps and the ``keep_best`` steps with the best
``best_metric`` are kept and the others deleted. Deletion of older steps only
happens once a newer checkpoint is complete, so a crash mid-save never leaves
fewer complete checkpoints than asked for, and a failed save (full or read-only
disk: one :class:`~jaxfer.errors.WorkdirError` naming the path) deletes
nothing. Nothing is ever deleted on restore. No checkpoint holding a NaN or an
inf is written (:class:`~jaxfer.errors.NonFiniteError`).

Trainable-only checkpoints: with ``trainable`` (a bool tree over the params) only
the trainable params are written (plus the optimizer state, which holds nothing
for frozen leaves anyway). Restoring takes every other param from the template,
which must then be the pretrained state the run started from.

Restart precedence (:func:`initial_state`): the latest checkpoint in the workdir,
if there is one, wins over the initial state the caller built (pretrained
weights or a fresh init). A run is therefore resumed simply by running it again
with the same workdir; to start over, use a new workdir. An unreadable latest
checkpoint falls back to the newest readable one (unless ``strict``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxfer import tree
from jaxfer import workdir as workdir_lib
from jaxfer.errors import CheckpointError, NonFiniteError, UnreadableCheckpointError
from jaxfer.train.state import TrainState

logger = logging.getLogger(__name__)
PyTree = Any
FORMAT_VERSION = 1
SECTIONS = ("params", "opt_state", "model_state")
_MAX_LISTED = 20


_finite_leaves = jax.jit(lambda leaves: {p: jnp.all(jnp.isfinite(x)) for p, x in leaves.items()})


def nonfinite_paths(flat: Mapping[str, Any]) -> list[str]:
    """Paths of the float leaves of ``{path: array}`` holding a NaN or an inf (one jitted pass)."""
    floats = {p: x for p, x in flat.items()
              if jnp.issubdtype(_dtype(x), jnp.inexact)}
    if not floats:
        return []
    finite = jax.device_get(_finite_leaves(floats))
    return sorted(p for p, ok in finite.items() if not np.all(ok))


# ------------------------------------------------------------------ helpers
def _join(*parts: str) -> str:
    return tree.SEP.join(p for p in parts if p)


def _is_typed_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def to_jsonable(x: Any) -> Any:
    """Numbers, arrays and nested containers -> plain JSON values."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x.tolist()
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(x.to_dict())
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _all_finite_numbers(metrics: Mapping) -> bool:
    """No top-level number in ``metrics`` is NaN or inf."""
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def _flat_state(state: TrainState, trainable: PyTree | None) -> dict[str, Any]:
    """``{section/path: leaf}`` of what a checkpoint stores (rng still as a key)."""
    flat = {"step": state.step, "rng": state.rng}
    params = tree.flatten(state.params)
    if trainable is not None:
        keep = {p: bool(m) for p, m in tree.flatten(trainable).items()}
        if keep.keys() != params.keys():
            missing = sorted(params.keys() - keep.keys())[:_MAX_LISTED]
            extra = sorted(keep.keys() - params.keys())[:_MAX_LISTED]
            raise ValueError(f"trainable mask does not match the params: params without a "
                             f"mask entry {missing}, mask entries without a param {extra}")
        params = {p: v for p, v in params.items() if keep[p]}
    flat.update({_join("params", p): v for p, v in params.items()})
    for section in SECTIONS[1:]:
        flat.update({_join(section, p): v for p, v in tree.flatten(getattr(state, section)).items()})
    return flat


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _describe(x) -> dict[str, Any]:
    return {"shape": list(np.shape(x)), "dtype": str(_dtype(x))}


def _key_data_sharding(sharding, ndim: int):
    """The sharding of ``key_data(keys)`` given that of ``keys`` (trailing dim replicated)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
    """A restore target for one leaf, on the template leaf's sharding."""
    sharding = sharding or getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding)


def _mismatch_message(step_dir: str, missing, unexpected, shapes) -> str:
    lines = [f"checkpoint {step_dir} does not match the template state:"]
    for title, items in (("in the template but not in the checkpoint", missing),
                         ("in the checkpoint but not in the template", unexpected),
                         ("with different shapes (checkpoint vs template)", shapes)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            lines.append(f"  {len(items)} paths {title}{more}:")
            lines += [f"    {item}" for item in items[:_MAX_LISTED]]
    lines.append("Build the template with the same model and optimizer as the saved run "
                 "(and, for trainable-only checkpoints, from the same pretrained weights).")
    return "\n".join(lines)


# ------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves and restores training checkpoints under ``workdir/checkpoints``.

    Args:
      workdir: the run directory.
      keep: how many of the most recent checkpoints to keep (at least 1).
      keep_best: how many of the best checkpoints by ``best_metric`` to keep as
        well (checkpoints saved without that metric never count as best).
      best_metric: key of the eval metrics dict given to :meth:`save`.
      best_mode: ``"max"`` or ``"min"``.
      trainable: bool tree over the params; when given, only trainable params
        are written (see the module docstring).
      async_save: write in a background thread (``save`` returns after the
        arrays are copied to host memory); :meth:`wait` blocks until done.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 1, keep_best: int = 0,
                 best_metric: str | None = None, best_mode: str = "max",
                 trainable: PyTree | None = None, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if keep_best and not best_metric:
            raise ValueError("keep_best > 0 needs best_metric")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.join(os.fspath(workdir), "checkpoints")
        if workdir_lib.is_local(self.directory):
            self.directory = os.path.abspath(self.directory)
        self.keep, self.keep_best = int(keep), int(keep_best)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.trainable = trainable
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save)
        with workdir_lib.disk_errors(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._metrics: dict[int, dict | None] = {}

    # -- queries
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def metrics(self, step: int) -> dict | None:
        """The eval metrics saved with ``step`` (``None`` when none were given)."""
        if step not in self._metrics:
            self._metrics[step] = self._read_meta(step).get("metrics")
        return self._metrics[step]

    def _score(self, step: int) -> float | None:
        try:
            metrics = self.metrics(step) or {}
        except CheckpointError:
            return None
        value = metrics.get(self.best_metric)
        if not isinstance(value, (int, float)) or not _all_finite_numbers(metrics):
            return None  # NaN logits can give a finite accuracy: any NaN disqualifies
        return float(value) if self.best_mode == "max" else -float(value)

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (latest wins ties), or ``None``."""
        if not self.best_metric:
            return None
        scored = [(s, step) for step in self.all_steps() if (s := self._score(step)) is not None]
        return max(scored)[1] if scored else None

    # -- saving
    def save(self, step: int, state: TrainState, *, data_state: Mapping | None = None,
             metrics: Mapping | None = None, config: Any = None, force: bool = False) -> bool:
        """Write a checkpoint of ``state`` at ``step``; every process must call it.

        Returns ``False`` (and writes nothing) when ``step`` is already saved,
        unless ``force``, which replaces that checkpoint.
        """
        step = int(step)
        self.wait()  # the previous save is complete: safe to prune older ones
        if step in self.all_steps():
            if not force:
                return False
            self._manager.delete(step)
        flat = _flat_state(state, self.trainable)
        rng = flat["rng"]
        typed = _is_typed_key(rng)
        if typed:
            flat["rng"] = jax.random.key_data(rng)
        bad = nonfinite_paths(flat)
        if bad:
            raise NonFiniteError(
                f"refusing to save step {step} to {self.directory}: {len(bad)} leaves hold NaN or "
                f"inf, e.g. {bad[:5]}; the checkpoints already there are kept")
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
            "trainable_only": self.trainable is not None,
            "leaves": {p: _describe(v) for p, v in flat.items()},
            "data_state": to_jsonable(data_state),
            "metrics": to_jsonable(metrics),
        }
        items = {"state": ocp.args.StandardSave(tree.unflatten(flat)),
                 "meta": ocp.args.JsonSave(meta)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(to_jsonable(config))
        with self._disk_errors(step):
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._metrics[step] = meta["metrics"]
        return True

    def _prune(self) -> None:
        steps = self.all_steps()
        keep = set(steps[-self.keep:])
        if self.keep_best:
            scored = sorted(((s, step) for step in steps
                             if (s := self._score(step)) is not None), reverse=True)
            keep |= {step for _, step in scored[: self.keep_best]}
        for step in steps:
            if step not in keep:
                self._manager.delete(step)
                self._metrics.pop(step, None)

    def _disk_errors(self, step: int | None = None):
        """A full or read-only disk while saving: one message; the older checkpoints are intact."""
        kept = [s for s in self.all_steps() if s != step] if os.path.isdir(self.directory) or \
            not workdir_lib.is_local(self.directory) else []
        return workdir_lib.disk_errors(
            self.step_dir(step) if step is not None else self.directory,
            f"the checkpoints already there are intact (steps {kept})" if kept else
            "no earlier checkpoint was there")

    def wait(self) -> None:
        """Block until the pending save is on disk, then apply retention (not after a failed save)."""
        with self._disk_errors():
            self._manager.wait_until_finished()
        self._prune()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring
    def _corrupt(self, step: int, error: Exception) -> UnreadableCheckpointError:
        others = [s for s in self.all_steps() if s != step]
        hint = (f"pass step= one of {others} to restore an earlier checkpoint, or delete "
                f"{self.step_dir(step)} to resume from the one before it" if others else
                f"delete {self.step_dir(step)} to start from the initial state")
        return UnreadableCheckpointError(
            f"checkpoint {self.step_dir(step)} is partial or corrupt and cannot be read "
            f"({type(error).__name__}: {str(error).strip()[:500]}). Nothing was deleted; {hint}.",
            step)

    def set_aside(self, step: int) -> str:
        """Move the checkpoint of ``step`` to ``workdir/checkpoints.unreadable/`` (process 0);
        returns where it went."""
        target = os.path.join(f"{self.directory}.unreadable", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            with workdir_lib.disk_errors(target):
                workdir_lib.makedirs(os.path.dirname(target))
                workdir_lib.path(self.step_dir(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxfer: unreadable checkpoint set aside")
        self._manager.reload()
        self._metrics.pop(step, None)
        return target

    def _read_meta(self, step: int) -> dict:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
            if not isinstance(meta, dict) or "leaves" not in meta:
                raise ValueError("the meta item holds no manifest")
            return meta
        except Exception as e:  # orbax and tensorstore raise many kinds
            raise self._corrupt(step, e) from e

    def restore(self, template_state: TrainState, step: int | None = None, *,
                best: bool = False) -> tuple[TrainState, dict | None, dict | None]:
        """Restore ``(state, data_state, metrics)`` onto the template's structure and shardings.

        Args:
          template_state: a concrete state or an abstract one (``jax.eval_shape``,
            ``ShapeDtypeStruct`` leaves with shardings for sharded/multi-host
            restores). For trainable-only checkpoints its params supply the
            frozen leaves, so it must then be concrete for those.
          step: which step (default: the latest, or the best with ``best=True``).

        Raises:
          CheckpointError: no checkpoint, a corrupt one (naming its directory),
            or a template whose paths or shapes differ (naming the paths).
        """
        if step is None:
            step = self.best_step() if best else self.latest_step()
            if step is None:
                what = f"with metric {self.best_metric!r}" if best else "at all"
                raise CheckpointError(f"no checkpoint {what} in {self.directory}")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; "
                                  f"available: {self.all_steps()}")
        meta = self._read_meta(step)
        target = self._restore_target(step, template_state, meta)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(tree.unflatten(target))))["state"]
        except Exception as e:
            raise self._corrupt(step, e) from e
        state = self._rebuild(template_state, tree.flatten(restored), meta)
        self._metrics[step] = meta.get("metrics")
        return state, meta.get("data_state"), meta.get("metrics")

    def _restore_target(self, step: int, template: TrainState, meta: dict) -> dict[str, Any]:
        """``{path: ShapeDtypeStruct}`` to read; raises on any structural mismatch."""
        expected = _flat_state(template, None)
        rng = expected["rng"]
        if meta["rng_impl"] is not None:
            if not _is_typed_key(rng):
                raise CheckpointError(f"checkpoint {self.step_dir(step)} holds a typed PRNG key "
                                      f"but the template's rng has dtype {rng.dtype}")
            data = jax.eval_shape(jax.random.key_data, rng)
            sharding = _key_data_sharding(getattr(rng, "sharding", None), len(data.shape))
            expected["rng"] = _abstract(data, sharding)
        saved = meta["leaves"]
        optional = {p for p in expected if p.startswith("params/")} if meta["trainable_only"] else set()
        missing = sorted(p for p in expected.keys() - saved.keys() if p not in optional)
        unexpected = sorted(saved.keys() - expected.keys())
        shapes = sorted(f"{p}: {tuple(saved[p]['shape'])} vs {tuple(np.shape(expected[p]))}"
                        for p in saved.keys() & expected.keys()
                        if tuple(saved[p]["shape"]) != tuple(np.shape(expected[p])))
        if missing or unexpected or shapes:
            raise CheckpointError(_mismatch_message(self.step_dir(step), missing, unexpected, shapes))
        abstract = sorted(p for p in optional - saved.keys()
                          if isinstance(expected[p], jax.ShapeDtypeStruct))
        if abstract:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} holds only the trainable params; the "
                f"others come from the template, which must hold concrete (pretrained) "
                f"values for them, but {len(abstract)} are abstract, e.g. {abstract[:5]}")
        return {p: _abstract(expected[p]) for p in saved}

    @staticmethod
    def _rebuild(template: TrainState, restored: dict[str, Any], meta: dict) -> TrainState:
        rng = restored["rng"]
        if meta["rng_impl"] is not None:
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])

        def section(name: str) -> PyTree:
            return tree.map_with_path(lambda p, leaf: restored.get(_join(name, p), leaf),
                                      getattr(template, name))

        return template.replace(step=restored["step"], rng=rng,
                                **{name: section(name) for name in SECTIONS})


def initial_state(checkpointer: Checkpointer | None, init_state: TrainState, *,
                  strict: bool = False) -> tuple[TrainState, dict | None, bool]:
    """``(state, data_state, resumed)`` by the fixed restart precedence.

    The latest checkpoint of ``checkpointer`` wins; without one (or without a
    checkpointer) the run starts from ``init_state`` (pretrained or scratch,
    built by the caller, also used as the restore template).

    An unreadable (partial or corrupt) latest checkpoint: with ``strict``,
    :class:`CheckpointError` naming it (nothing deleted). Otherwise the newest
    readable checkpoint is resumed, with a warning naming both, and each
    unreadable newer one is moved to ``workdir/checkpoints.unreadable/<step>``
    (kept for inspection; out of the way of the step that will be saved again).
    With no readable checkpoint at all it is an error. A template that does not
    fit is always an error (no older checkpoint would fit either).
    """
    if checkpointer is None or checkpointer.latest_step() is None:
        return init_state, None, False
    unreadable: list[UnreadableCheckpointError] = []
    for step in reversed(checkpointer.all_steps()):
        try:
            state, data_state, _ = checkpointer.restore(init_state, step=step)
        except UnreadableCheckpointError as e:
            if strict:
                raise
            unreadable.append(e)
            continue
        if unreadable:
            moved = [checkpointer.set_aside(e.step) for e in unreadable]
            logger.warning(
                "the latest checkpoint %s is unreadable (%s); resumed from the newest readable "
                "one, %s. Unreadable checkpoints moved to %s (train.strict_resume=True refuses "
                "instead)", checkpointer.step_dir(unreadable[0].step), unreadable[0],
                checkpointer.step_dir(step), ", ".join(moved))
        return state, data_state, True
    raise CheckpointError(f"no readable checkpoint in {checkpointer.directory}: "
                          + "; ".join(str(e) for e in unreadable))

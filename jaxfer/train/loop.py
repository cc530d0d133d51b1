"""The training loop: ``fit``, ``evaluate`` and ``predict``.

The loop is the one place (with the I/O edges) where side effects happen: it
drives a jitted ``train_step(state, batch) -> (state, metrics)``, evaluates with
``eval_step(state, batch) -> per-example outputs``, writes logs and checkpoints,
and resumes.

Resuming: when the checkpointer holds a checkpoint, :func:`fit` restores the
state and the data iterator's position from it (see
:func:`jaxfer.train.checkpoint.initial_state` for the precedence), and trains on
until ``steps`` optimizer steps in total. Each checkpoint stores the iterator
state after exactly ``step`` batches, so a resumed run sees the same batches and
ends with the same parameters as an uninterrupted one (given a deterministic
step function, which XLA's CPU and GPU compilers give for a fixed program).

Outputs in ``workdir`` (written by process 0 only, through :mod:`jaxfer.workdir`,
so a ``gs://`` workdir works):

* ``metrics.jsonl`` -- one JSON record per line: train records every
  ``log_every`` steps (``{"step", "split": "train", "loss", ..., "examples_per_sec"}``,
  means over the window's finite steps, ``nonfinite`` counting the skipped ones)
  and eval records (``"split": "eval"``, the full report of
  :func:`jaxfer.metrics.compute` plus ``loss``); see :mod:`jaxfer.train.runlog`.
* ``tb/`` -- TensorBoard event files (scalars only), via tensorboardX.
* ``curves.png`` -- train loss and eval metrics against steps.
* ``config.json`` -- the ``config`` given, if any.
* ``checkpoints/`` -- see :mod:`jaxfer.train.checkpoint`.
* ``jaxfer.lock`` -- held while the run lives: one run per workdir.

What stops a run: ``steps`` reached, data exhausted, early stopping, too many
non-finite steps in a row (:mod:`jaxfer.train.nonfinite`; nothing non-finite is
saved), or SIGTERM/SIGINT (:mod:`jaxfer.train.preemption`; the step is saved).

Metrics stay on the device between logging steps: the loop fetches them only
every ``log_every`` steps, so it never blocks the accelerator on every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from jaxfer import metrics as metrics_lib
from jaxfer import tree
from jaxfer.errors import ConfigError, DataError, NonFiniteError, Preempted, WorkdirError
from jaxfer.train.checkpoint import Checkpointer, initial_state
from jaxfer.train.nonfinite import NonFiniteWatch, finite_report
from jaxfer.train.preemption import StopRequests
from jaxfer.train.runlog import RunLog, scalars
from jaxfer.workdir import Lock

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
TrainStep = Callable[[Any, Batch], tuple[Any, dict]]
EvalStep = Callable[[Any, Batch], dict]
Hook = Callable[[int, Any, list[dict]], None]
MetricsFn = Callable[[dict[str, np.ndarray]], dict[str, Any]]


def current_step(state) -> int:
    """``state.step`` as an int; a replicated (pmap) state holds one copy per device."""
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])


def _identity(batch: Batch) -> Batch:
    return batch


def _is_main() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------ eval / predict
def _to_host(outputs: dict) -> dict[str, np.ndarray]:
    """Per-example outputs of one batch as numpy, every process's rows included;
    nested dicts (a multitask model's ``{"logits": {task: ...}}``) flattened to
    ``"logits/<task>"`` keys."""
    outputs = tree.flatten(outputs)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return dict(multihost_utils.process_allgather(outputs, tiled=True))
    return {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}


def predict(state, eval_step: EvalStep, batches: Iterable[Batch], *,
            shard_batch: Callable[[Batch], Batch] | None = None) -> dict[str, np.ndarray]:
    """Every per-example output of ``eval_step`` over ``batches``, padding rows dropped.

    Returns ``{key: array}`` concatenated along the batch axis (``logits``,
    ``label``, ``loss``, ... whatever ``eval_step`` returns, ``mask`` removed;
    nested outputs under ``"outer/inner"`` keys),
    one row per real example; with several processes every process gets all rows.
    Outputs of batch ``i`` are fetched while batch ``i + 1`` runs.
    """
    shard_batch = shard_batch or _identity
    chunks: list[dict[str, np.ndarray]] = []
    pending = None
    for batch in batches:
        outputs = eval_step(state, shard_batch(batch))
        if "mask" not in outputs:
            raise KeyError("eval_step must return a per-example 'mask' (0 for padding rows)")
        if pending is not None:
            chunks.append(_to_host(pending))
        pending = outputs
    if pending is not None:
        chunks.append(_to_host(pending))
    if not chunks:
        return {}
    keys = [k for k in chunks[0] if k != "mask"]
    real = np.concatenate([c["mask"].reshape(-1) for c in chunks]) > 0
    return {k: np.concatenate([c[k] for c in chunks])[real] for k in keys}


def evaluate(state, eval_step: EvalStep, batches: Iterable[Batch], *,
             task: str = "classification", label_names: Sequence[str] | None = None,
             shard_batch: Callable[[Batch], Batch] | None = None,
             metrics_fn: MetricsFn | None = None) -> dict[str, Any]:
    """Task metrics plus ``loss`` over one pass of ``batches``.

    The metrics are ``metrics_fn(outputs)`` of the per-example outputs of
    :func:`predict` (the evaluation hook: a multitask model's is
    :func:`jaxfer.transfer.multitask.metrics_fn`), by default
    ``jaxfer.metrics.compute(task, outputs["logits"], outputs["label"], label_names)``.
    ``loss`` is ``sum(loss) / sum(weight)`` over real rows (``make_eval_step`` returns
    each row's weighted loss sum and weight sum: one example's loss and 1, or its
    token losses and token count), the plain mean without ``weight``; every example
    counts exactly once, padding rows (``mask == 0``) and, across processes, duplicates never.
    """
    outputs = predict(state, eval_step, batches, shard_batch=shard_batch)
    if not outputs:
        raise ValueError("evaluate got no batches")
    loss = outputs["loss"].astype(np.float64)
    weight = outputs.get("weight", np.ones_like(loss)).astype(np.float64)
    if metrics_fn is None:
        report = metrics_lib.compute(task, outputs["logits"], outputs["label"], label_names)
    else:
        report = dict(metrics_fn(outputs))
    report["loss"] = float(loss.sum() / weight.sum()) if weight.sum() > 0 else 0.0
    report["num_examples"] = int(len(loss))
    return report


# ----------------------------------------------------------------- logging
# --------------------------------------------------------------------- fit
def _window_record(step: int, window: list[dict], examples: int, seconds: float) -> dict:
    """Mean of each train metric over the steps since the last log.

    Steps the non-finite guard skipped count in ``nonfinite`` (and ``examples``)
    but not in the means; a value that is still not finite is left out, so the
    log never holds NaN or inf.
    """
    host = jax.device_get(window)
    skipped = [float(np.max(m.get("nonfinite", 0.0))) > 0 for m in host]
    kept = [m for m, s in zip(host, skipped) if not s]
    record: dict[str, Any] = {"step": step, "split": "train"}
    for key in host[0]:
        if key == "examples":
            record[key] = float(np.sum([np.mean(m[key]) for m in host]))
        elif key == "nonfinite":
            record[key] = int(sum(skipped))
        elif kept:
            value = float(np.mean([np.mean(m[key]) for m in kept]))
            if math.isfinite(value):
                record[key] = value
    record["examples_per_sec"] = examples / seconds if seconds > 0 else 0.0
    return record


def _check_labels(batch: Batch, num_classes: int, step: int) -> None:
    """Class ids of a host batch in ``[0, num_classes)`` (``-100``: ignored), else a DataError."""
    labels = batch.get("label")
    if labels is None or not np.issubdtype(np.asarray(labels).dtype, np.integer):
        return
    labels = np.asarray(labels)
    bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise DataError(f"step {step}: labels {sorted(set(labels[bad].tolist()))[:5]} are outside "
                        f"[0, {num_classes}) for the {num_classes} label_names; nothing was trained "
                        "on this batch")


def _batch_examples(batch: Batch) -> int:
    """Real examples in a host batch (all processes together)."""
    if "mask" in batch:
        n = float(np.sum(batch["mask"]))
    else:
        n = len(next(iter(batch.values())))
    return int(n) * jax.process_count()


class _EarlyStopping:
    """Tracks ``best_metric``; ``stop`` after ``patience`` evals without improvement."""

    def __init__(self, metric: str, mode: str, patience: int, saved: dict | None):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode, self.patience = metric, mode, patience
        saved = saved or {}
        self.best, self.best_step = saved.get("best"), saved.get("best_step")
        self.bad = int(saved.get("evals_without_improvement", 0))

    def update(self, step: int, report: dict) -> bool:
        if self.metric not in report:
            if not self.patience:  # only tracked for early stopping; nothing to stop
                return False
            raise KeyError(f"best_metric {self.metric!r} is not among the eval metrics "
                           f"{sorted(scalars(report))}")
        value = float(report[self.metric])
        better = finite_report(report) and (  # a non-finite evaluation is never the best
            self.best is None or (value > self.best if self.mode == "max" else value < self.best))
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "evals_without_improvement": self.bad}


def hold_lock(workdir: str) -> Lock | None:
    """Take ``workdir``'s lock on process 0; every process fails if that does."""
    lock, error = Lock(workdir), None
    if _is_main():
        try:
            lock.acquire()
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
            error = WorkdirError(f"workdir {workdir} is in use by another run (process 0 says why)")
    if error is not None:
        raise error
    return lock if _is_main() else None


def fit(
    state,
    train_step: TrainStep,
    train_iter,
    *,
    steps: int,
    eval_step: EvalStep | None = None,
    eval_batches: Iterable[Batch] | None = None,
    eval_every: int = 0,
    task: str = "classification",
    label_names: Sequence[str] | None = None,
    workdir: str | os.PathLike | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    log_every: int = 10,
    best_metric: str = "accuracy",
    best_mode: str = "max",
    patience: int = 0,
    max_nonfinite_skips: int = 5,
    strict_resume: bool = False,
    max_seconds: float | None = None,
    config: Any = None,
    shard_batch: Callable[[Batch], Batch] | None = None,
    progress: bool = True,
    hooks: Sequence[Hook] = (),
    metrics_fn: MetricsFn | None = None,
) -> tuple[Any, list[dict]]:
    """Train until ``state.step == steps``, resuming from ``checkpointer`` if it has a checkpoint.

    Args:
      state: the initial ``TrainState`` (pretrained or scratch); also the
        restore template when resuming.
      train_step: jitted ``(state, batch) -> (state, metrics)``; one call is one
        optimizer step; ``metrics`` is a dict of scalars (``loss``, ``grad_norm``,
        optionally ``lr``, ``examples``).
      train_iter: yields host batches; ``get_state()``/``set_state()`` make the
        run resumable (iterators without them are not restored).
      steps: total optimizer steps, counting those of a resumed run.
      eval_step, eval_batches: per-example outputs and a re-iterable set of
        padded batches; evaluated every ``eval_every`` steps (0: only at the end).
      task, label_names, metrics_fn: the evaluation's metrics (see :func:`evaluate`);
        with ``label_names``, a classification batch whose class ids fall outside
        them is a :class:`~jaxfer.errors.DataError` before its step runs.
      workdir: where logs, plots and (by default) checkpoints go.
      checkpointer: default, when ``workdir`` and ``checkpoint_every`` are given,
        a ``Checkpointer(workdir)`` keeping the latest checkpoint and the best
        by ``best_metric`` (closed at the end).
      checkpoint_every: save every this many steps (0: only at the end). Eval
        metrics are attached to a checkpoint only when evaluation ran at that
        step, so align it with ``eval_every`` for best-checkpoint retention.
      log_every: fetch and log train metrics every this many steps.
      best_metric, best_mode, patience: early stopping after ``patience`` evals
        without improvement of ``best_metric`` (0: never). An evaluation with a
        non-finite value is never the best.
      max_nonfinite_skips: how many steps in a row the step's non-finite guard
        may skip (``metrics["nonfinite"]``, see :func:`jaxfer.make_train_step`)
        before the run stops with :class:`~jaxfer.errors.NonFiniteError` naming
        the steps (0: stop at the first). Checked when metrics are fetched (every
        ``log_every`` steps, before evaluations and checkpoints), so the loop
        never waits on every step; skipped steps leave the state finite.
      strict_resume: refuse to start when the latest checkpoint is unreadable
        (default: resume from the newest readable one, with a warning naming
        both; see :func:`jaxfer.train.checkpoint.initial_state`).
      max_seconds: a time budget: once this many seconds have passed since
        ``fit`` started, the step that ends is evaluated and checkpointed and
        training stops there (a ``"stop"`` record with reason ``"time_budget"``
        says so); ``None`` or 0: no budget. Run again to continue.
      config: saved as ``workdir/config.json`` and with each checkpoint.
      shard_batch: host batch -> device batch (e.g. ``jaxfer.train.parallel.shard_batch``).
      progress: a tqdm bar on process 0.
      hooks: ``hook(step, state, records)`` after each step's logging, eval and
        checkpoint; ``records`` are the history records written at that step.

    Returns:
      ``(state, history)``: the final state and the list of log records.

    The workdir is locked for the run (:class:`jaxfer.workdir.Lock`: a second
    run on it is an error naming the first). SIGTERM or SIGINT (on several
    hosts: JAX's preemption sync point) finish the current step, save a
    checkpoint and raise :class:`~jaxfer.errors.Preempted`.

    Raises:
      NonFiniteError: too many non-finite steps in a row (nothing non-finite
        is ever saved).
      Preempted: stopped by a signal or preemption notice, after saving.
      DataError: the training iterator yields no batch at all.
      WorkdirError: the workdir is in use, read-only or full.
    """
    shard_batch = shard_batch or _identity
    workdir = os.fspath(workdir) if workdir is not None else None
    can_eval = eval_step is not None and eval_batches is not None
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be a positive number of optimizer steps, got {steps!r}")
    if log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {log_every}")
    if (eval_every or patience) and not can_eval:
        raise ValueError("eval_every and patience need eval_step and eval_batches")
    if not hasattr(train_iter, "__next__"):
        train_iter = iter(train_iter)
    own_checkpointer = checkpointer is None and workdir is not None and checkpoint_every > 0
    with contextlib.ExitStack() as cleanup:  # undone in reverse: the lock is released last
        lock = hold_lock(workdir) if workdir is not None else None
        if lock is not None:
            cleanup.callback(lock.release)
        if own_checkpointer:
            checkpointer = Checkpointer(workdir, keep=2, keep_best=1 if can_eval else 0,
                                        best_metric=best_metric, best_mode=best_mode)
            cleanup.callback(checkpointer.close)
        state, saved, resumed = initial_state(checkpointer, state, strict=strict_resume)
        saved = saved or {}
        iterator_state = saved["iterator"] if "iterator" in saved else (saved or None)
        if iterator_state is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(iterator_state)
        start = current_step(state)
        if resumed:
            logger.info("resumed from %s at step %d", checkpointer.directory, start)
        log = RunLog(workdir, start if resumed else None, config)
        cleanup.callback(log.close)
        if checkpointer is not None and not own_checkpointer:
            cleanup.callback(checkpointer.wait)
        stopper = _EarlyStopping(best_metric, best_mode, patience, saved.get("early_stopping"))
        watch = NonFiniteWatch(max_nonfinite_skips)

        def stop_if_nonfinite(step: int) -> None:
            why = watch.check()
            if why is not None:
                log.write({"step": step, "split": "stop", "reason": "nonfinite", "message": why})
                raise NonFiniteError(f"training stopped at step {step}: {why}")

        def save(step: int, data_state, eval_report=None) -> None:
            stop_if_nonfinite(step)
            checkpointer.save(step, state, config=config, metrics=eval_report, data_state={
                "iterator": data_state, "early_stopping": stopper.state()})

        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(start, steps), unit="step", dynamic_ncols=True,
                   disable=not (progress and _is_main()))
        cleanup.callback(bar.close)
        stop_requests = cleanup.enter_context(StopRequests())
        window, window_examples, window_start = [], 0, time.perf_counter()
        started = window_start
        step, last_eval, last_save, stop = start, None, None, False
        while step < steps and not stop:
            try:
                batch = next(train_iter)
            except StopIteration:
                if step == start:
                    raise DataError(f"the training data yielded no batch (step {step} of {steps}): "
                                    "an empty source, or fewer examples than one batch") from None
                logger.warning("training data ran out at step %d of %d", step, steps)
                break
            data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
            if label_names is not None and task == "classification":
                _check_labels(batch, len(label_names), step + 1)
            window_examples += _batch_examples(batch)
            state, step_metrics = train_step(state, shard_batch(batch))
            step += 1
            window.append(step_metrics)
            watch.add(step, step_metrics)
            bar.update(1)
            records: list[dict] = []
            out_of_time = bool(max_seconds) and time.perf_counter() - started >= max_seconds
            if step % log_every == 0 or step == steps or out_of_time:
                jax.block_until_ready(step_metrics)  # time the computation, not its dispatch
                stop_if_nonfinite(step)
                now = time.perf_counter()
                record = _window_record(step, window, window_examples, now - window_start)
                window, window_examples, window_start = [], 0, now
                log.write(record)
                records.append(record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "examples_per_sec")
                                 if k in record}, refresh=False)
            eval_report = None
            if can_eval and ((eval_every and step % eval_every == 0) or step == steps or out_of_time):
                stop_if_nonfinite(step)
                eval_report = evaluate(state, eval_step, eval_batches, task=task,
                                       label_names=label_names, shard_batch=shard_batch,
                                       metrics_fn=metrics_fn)
                last_eval = step
                record = {"step": step, "split": "eval", **eval_report}
                log.write(record)
                records.append(record)
                stop = stopper.update(step, eval_report)
                logger.info("step %d: eval %s", step, "  ".join(
                    f"{k} {v:.4g}" for k, v in scalars(eval_report).items() if k != "num_examples"))
                window_start = time.perf_counter()  # keep eval time out of examples/s
            if checkpointer is not None and (
                    (checkpoint_every and step % checkpoint_every == 0) or step == steps or stop
                    or out_of_time):
                save(step, data_state, eval_report)
                last_save = step
            if stop:
                record = {"step": step, "split": "stop", "reason": "early_stopping",
                          "best_step": stopper.best_step, best_metric: stopper.best}
                log.write(record)
                records.append(record)
            if out_of_time and not stop and step < steps:
                stop = True
                record = {"step": step, "split": "stop", "reason": "time_budget", "max_seconds": max_seconds}
                log.write(record)
                records.append(record)
                logger.info("time budget of %g s spent: stopped at step %d of %d (checkpointed)",
                            max_seconds, step, steps)
            for hook in hooks:
                hook(step, state, records)
            if lock is not None:
                lock.refresh()
            if stop_requests.requested(step):  # SIGTERM/SIGINT, or the hosts' preemption sync point
                if checkpointer is not None and last_save != step:
                    save(step, data_state)
                if checkpointer is not None:
                    checkpointer.wait()
                error = Preempted(step, checkpointer.directory if checkpointer else None,
                                  stop_requests.signum)
                log.write({"step": step, "split": "stop", "reason": "preempted", "message": str(error)})
                logger.warning("%s", error)
                raise error
        if step > start and step < steps and not stop:  # data ran out: finish cleanly
            stop_if_nonfinite(step)
            if can_eval and last_eval != step:
                log.write({"step": step, "split": "eval", **evaluate(
                    state, eval_step, eval_batches, task=task, label_names=label_names,
                    shard_batch=shard_batch, metrics_fn=metrics_fn)})
            if checkpointer is not None:
                save(step, train_iter.get_state() if hasattr(train_iter, "get_state") else None)
    return state, log.history

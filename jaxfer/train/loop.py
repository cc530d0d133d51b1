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

Outputs in ``workdir`` (written by process 0 only):

* ``metrics.jsonl`` -- one JSON record per line: train records every
  ``log_every`` steps (``{"step", "split": "train", "loss", ..., "examples_per_sec"}``,
  means over the window) and eval records (``"split": "eval"``, the full report
  of :func:`jaxfer.metrics.compute` plus ``loss``). On resume, records after the
  restored step are dropped, so the file reads like one run.
* ``tb/`` -- TensorBoard event files (scalars only), via tensorboardX.
* ``curves.png`` -- train loss and eval metrics against steps.
* ``config.json`` -- the ``config`` given, if any.
* ``checkpoints/`` -- see :mod:`jaxfer.train.checkpoint`.

Metrics stay on the device between logging steps: the loop fetches them only
every ``log_every`` steps, so it never blocks the accelerator on every step.
"""

from __future__ import annotations

import json
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
from jaxfer.errors import NonFiniteError
from jaxfer.train.checkpoint import Checkpointer, initial_state, to_jsonable

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
def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    return x


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class _RunLog:
    """metrics.jsonl, TensorBoard and the history list (files on process 0 only)."""

    def __init__(self, workdir: str | None, resumed_step: int | None, config: Any):
        self.history: list[dict] = []
        self.workdir = workdir if workdir and _is_main() else None
        self._jsonl = self._tb = None
        if self.workdir is None:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if config is not None:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                json.dump(to_jsonable(config), f, indent=2)
        path = os.path.join(self.workdir, "metrics.jsonl")
        if resumed_step is not None and os.path.exists(path):  # drop records after the restore
            with open(path) as f:
                old = [json.loads(line) for line in f if line.strip()]
            self.history = [r for r in old if r.get("step", 0) <= resumed_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        elif os.path.exists(path):
            os.remove(path)
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))

    def write(self, record: dict) -> None:
        record = _finite_or_none(record)  # strict JSON: a NaN is never logged as a number
        self.history.append(record)
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in _scalars(record).items():
            self._tb.add_scalar(f"{record.get('split', 'train')}/{name}", value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            plot_curves(self.history, os.path.join(self.workdir, "curves.png"))


def plot_curves(history: Sequence[dict], path: str) -> None:
    """A PNG of train loss and every scalar eval metric against steps (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in history if r.get("split") == "train" and "loss" in r]
    evals = [r for r in history if r.get("split") == "eval"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_train.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax_train.set(xlabel="step", title="loss")
    ax_train.legend()
    names = [k for k in _scalars(evals[0]) if k not in ("loss", "num_examples")] if evals else []
    for name in names:
        ax_eval.plot([r["step"] for r in evals], [r.get(name, math.nan) for r in evals], "o-", label=name)
    ax_eval.set(xlabel="step", title="eval metrics")
    if names:
        ax_eval.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


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


def _finite_report(report: dict) -> bool:
    """Every scalar of an eval report is finite (NaN logits can still give a finite accuracy)."""
    return all(math.isfinite(v) for v in _scalars(report).values())


class _NonFiniteWatch:
    """Counts the steps the guard skipped, from ``metrics["nonfinite"]`` fetched lazily.

    Steps without that metric (a ``train_step`` built without the guard) count
    as non-finite when their ``loss`` is not finite, and stop the run at once:
    their state may already hold the NaN.
    """

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"max_nonfinite_skips must be >= 0, got {limit}")
        self.limit, self.pending, self.run = limit, [], []

    def add(self, step: int, metrics: dict) -> None:
        if "nonfinite" in metrics:
            self.pending.append((step, True, metrics["nonfinite"]))
        elif "loss" in metrics:
            self.pending.append((step, False, metrics["loss"]))

    def check(self) -> str | None:
        """``None``, or why the run must stop now."""
        values = jax.device_get([v for _, _, v in self.pending])
        pending, self.pending = self.pending, []
        for (step, guarded, _), value in zip(pending, values):
            bad = float(np.max(value)) > 0 if guarded else not np.all(np.isfinite(value))
            if not bad:
                self.run = []
                continue
            self.run.append(step)
            if not guarded:
                return (f"step {step} gave a non-finite loss and this train_step has no "
                        "non-finite guard (jaxfer.make_train_step has one), so its state may "
                        "hold NaN: stopped without saving it")
            if len(self.run) > self.limit:
                steps = f"steps {self.run[0]} to {step}" if len(self.run) > 1 else f"step {step}"
                return (f"non-finite loss, gradients or model state at {steps} ({len(self.run)} "
                        f"in a row, more than max_nonfinite_skips={self.limit}); each was "
                        f"skipped, so the parameters are those after step {self.run[0] - 1}. "
                        "Lower the learning rate, clip gradients, or check the data for "
                        "inf/NaN inputs and labels outside [0, num_classes)")
            logger.warning("step %d: non-finite loss, gradients or model state; update skipped "
                           "(%d in a row, at most %d)", step, len(self.run), self.limit)
        return None


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
                           f"{sorted(_scalars(report))}")
        value = float(report[self.metric])
        better = _finite_report(report) and (  # a non-finite evaluation is never the best
            self.best is None or (value > self.best if self.mode == "max" else value < self.best))
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "evals_without_improvement": self.bad}


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
      task, label_names, metrics_fn: the evaluation's metrics (see :func:`evaluate`).
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

    Raises:
      NonFiniteError: too many non-finite steps in a row (nothing non-finite
        is ever saved).
    """
    shard_batch = shard_batch or _identity
    workdir = os.fspath(workdir) if workdir is not None else None
    can_eval = eval_step is not None and eval_batches is not None
    if (eval_every or patience) and not can_eval:
        raise ValueError("eval_every and patience need eval_step and eval_batches")
    if not hasattr(train_iter, "__next__"):
        train_iter = iter(train_iter)
    own_checkpointer = checkpointer is None and workdir is not None and checkpoint_every > 0
    if own_checkpointer:
        checkpointer = Checkpointer(workdir, keep=1, keep_best=1 if can_eval else 0,
                                    best_metric=best_metric, best_mode=best_mode)
    state, saved, resumed = initial_state(checkpointer, state)
    saved = saved or {}
    iterator_state = saved["iterator"] if "iterator" in saved else (saved or None)
    if iterator_state is not None and hasattr(train_iter, "set_state"):
        train_iter.set_state(iterator_state)
    start = current_step(state)
    if resumed:
        logger.info("resumed from %s at step %d", checkpointer.directory, start)
    log = _RunLog(workdir, start if resumed else None, config)
    stopper = _EarlyStopping(best_metric, best_mode, patience, saved.get("early_stopping"))
    watch = _NonFiniteWatch(max_nonfinite_skips)

    def stop_if_nonfinite(step: int) -> None:
        why = watch.check()
        if why is not None:
            log.write({"step": step, "split": "stop", "reason": "nonfinite", "message": why})
            raise NonFiniteError(f"training stopped at step {step}: {why}")

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=min(start, steps), unit="step", dynamic_ncols=True,
               disable=not (progress and _is_main()))
    window, window_examples, window_start = [], 0, time.perf_counter()
    started = window_start
    step, last_eval, stop = start, None, False
    try:
        while step < steps and not stop:
            try:
                batch = next(train_iter)
            except StopIteration:
                logger.warning("training data ran out at step %d of %d", step, steps)
                break
            data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
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
                    f"{k} {v:.4g}" for k, v in _scalars(eval_report).items() if k != "num_examples"))
                window_start = time.perf_counter()  # keep eval time out of examples/s
            if checkpointer is not None and (
                    (checkpoint_every and step % checkpoint_every == 0) or step == steps or stop
                    or out_of_time):
                stop_if_nonfinite(step)
                checkpointer.save(step, state, config=config, metrics=eval_report, data_state={
                    "iterator": data_state, "early_stopping": stopper.state()})
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
        if step > start and step < steps and not stop:  # data ran out: finish cleanly
            stop_if_nonfinite(step)
            if can_eval and last_eval != step:
                log.write({"step": step, "split": "eval", **evaluate(
                    state, eval_step, eval_batches, task=task, label_names=label_names,
                    shard_batch=shard_batch, metrics_fn=metrics_fn)})
            if checkpointer is not None:
                checkpointer.save(step, state, config=config, data_state={
                    "iterator": train_iter.get_state() if hasattr(train_iter, "get_state") else None,
                    "early_stopping": stopper.state()})
    finally:
        bar.close()
        if checkpointer is not None:
            if own_checkpointer:
                checkpointer.close()
            else:
                checkpointer.wait()
        log.close()
    return state, log.history

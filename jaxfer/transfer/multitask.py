"""Multitask learning: several heads on one backbone, one loss, per-task metrics.

The model is ``TaskModel(backbone, heads.MultiHead({name: head}))``: each task's
head sits at ``classifier/<name>`` (so rules freeze or train it like any other
subtree: ``("classifier/topic/**", None)``), its logits at
``outputs["logits"][name]``. Its labels are the batch column ``task.label``;
a row without a label for a task holds ``-100`` (classification) or NaN and
counts for that task nowhere. Batches mixing several datasets by ratio come from
:class:`jaxfer.data.mixture.Mixture`.

**The loss.** For example ``i`` with task losses ``l_ti`` and label indicators
``m_ti`` (from :func:`jaxfer.train.losses.for_task`):

    fixed:        L_i = sum_t w_t l_ti m_ti
    uncertainty:  L_i = sum_t (exp(-s_t) l_ti + s_t) m_ti        (Kendall et al., 2018)

and the step minimises the mean of ``L_i`` over the rows with at least one
label. ``w_t`` is ``task.weight``; ``s_t = log sigma_t^2`` are learned
parameters (``classifier/log_var/<name>``, ``MultiHead(uncertainty=True)``),
trained by the optimizer like any other leaf: a noisy task's weight
``exp(-s_t)`` falls, and the ``+ s_t`` keeps it from falling to 0. When every
row has every label this is ``sum_t w_t mean_i l_ti``; with one task per row
(datasets mixed by ratio) each task's mean loss counts by its share of the batch.

**Metrics.** :func:`metrics_fn` is the evaluation hook for
:func:`jaxfer.train.loop.evaluate`: each task's report from
:func:`jaxfer.metrics.compute` on its labelled rows, flattened as
``<name>/<metric>`` (``sentiment/accuracy``, ``confidence/r2``; any of them can
be a recipe's ``best_metric``), the full reports under ``"tasks"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxfer import metrics, tasks as tasks_lib
from jaxfer.train import losses
from jaxfer.train.losses import LossFn

WEIGHTINGS = ("fixed", "uncertainty")


def loss_fn(tasks: Sequence[tasks_lib.Task], weighting: str = "fixed", **kwargs: Any) -> LossFn:
    """The combined per-example loss of ``tasks`` (see the module doc); ``kwargs``
    (``label_smoothing=...``) go to the classification tasks' losses."""
    tasks_lib.check_names(tasks)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    per_task = {t.name: losses.for_task(t.kind, label_key=t.label,
                                        **(kwargs if t.kind == "classification" else {}))
                for t in tasks}

    def combined(outputs, batch):
        logits = outputs["logits"]
        if not isinstance(logits, dict) or set(logits) != set(per_task):
            raise ValueError(f"a multitask loss needs outputs['logits'] = {{task: logits}} for tasks "
                             f"{sorted(per_task)}; got {sorted(logits) if isinstance(logits, dict) else 'an array'}")
        total, labelled = 0.0, 0.0
        for t in tasks:
            l_t, m_t = per_task[t.name]({"logits": logits[t.name]}, batch)
            if l_t.ndim != 1:
                raise ValueError(f"task {t.name!r}: multitask losses are per example ([B]), got {l_t.shape}")
            if weighting == "uncertainty":
                s = outputs["log_var"][t.name]
                total = total + (jnp.exp(-s) * l_t + s) * m_t
            else:
                total = total + t.weight * l_t * m_t
            labelled = jnp.maximum(labelled, m_t)
        return total, labelled

    return combined


def metrics_fn(tasks: Sequence[tasks_lib.Task]):
    """``fn(outputs) -> report`` over the host outputs of ``evaluate`` (keys
    ``logits/<name>`` and each task's label column)."""
    tasks_lib.check_names(tasks)

    def fn(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        report: dict[str, Any] = {"tasks": {}}
        for t in tasks:
            logits, labels = outputs[f"logits/{t.name}"], outputs[t.label]
            has = _labelled(t.kind, labels)
            r = metrics.compute(t.kind, logits[has], labels[has], t.label_names)
            report["tasks"][t.name] = r
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    report[f"{t.name}/{k}"] = v
        return report

    return fn


def _labelled(kind: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    flat = labels.reshape(len(labels), -1)
    if kind == "classification" and np.issubdtype(labels.dtype, np.integer):
        return (flat >= 0).all(1)
    return ~np.isnan(flat.astype(np.float64)).any(1)


def label_keys(tasks: Sequence[tasks_lib.Task]) -> tuple[str, ...]:
    """The batch columns the eval step must return (``make_eval_step(label_key=...)``)."""
    return tuple(dict.fromkeys(t.label for t in tasks))


def format_report(report: dict[str, Any]) -> str:
    """Each task's metrics, as :func:`jaxfer.metrics.format_report` renders them."""
    parts = []
    for name, r in report.get("tasks", {}).items():
        parts.append(f"[{name}]\n{metrics.format_report(r)}")
    return "\n\n".join(parts)

"""What a recipe optimises and how it is judged: config -> head, losses, evaluation hook.

Three shapes of recipe, each switched on by its config section:

* one task (``c.task``, a kind from :data:`jaxfer.tasks.KINDS`, and
  ``c.model.num_classes``): a ``heads.Classifier``, ``losses.for_task``,
  ``metrics.compute``;
* several tasks on one backbone (``c.multitask.tasks``: ``(name, kind,
  num_classes[, weight[, label_names]])`` rows, each task's labels in the data
  column ``name``, an empty cell meaning "no label";
  ``c.multitask.weighting``: ``"fixed"`` or ``"uncertainty"``): a
  ``heads.MultiHead`` under ``classifier/<name>``, the combined loss and the
  per-task metrics of :mod:`jaxfer.transfer.multitask`;
* domain adaptation (``c.adapt.method``, one of
  :data:`jaxfer.transfer.adapt.METHODS`; ``c.adapt.target`` overrides ``c.data``
  to read the target domain): an ``adapt.DomainClassifier`` and the method's
  term (weight ``c.adapt.weight``) added to the loss of labelled source rows.
  ``"none"`` trains on the source alone: source-only and adapted runs differ by
  this one key.

``experiment`` calls these; they are the whole difference between the shapes.
"""

from __future__ import annotations

from typing import Any

from jaxfer import tasks as tasks_lib
from jaxfer.models import heads
from jaxfer.train import losses
from jaxfer.transfer import adapt, multitask, regularizers


# ------------------------------------------------------------------ reading
def task_list(cfg) -> tuple[tasks_lib.Task, ...] | None:
    """The recipe's tasks when it is a multitask recipe, else ``None``."""
    section = cfg.get("multitask")
    if not section or not section.get("tasks"):
        return None
    rows = []
    for row in section.tasks:
        name, kind, num_classes, *rest = row
        rows.append(tasks_lib.Task(name, kind, int(num_classes), weight=float(rest[0]) if rest else 1.0,
                                   label_names=tuple(rest[1]) if len(rest) > 1 and rest[1] else None))
    tasks_lib.check_names(rows)
    return tuple(rows)


def adapt_method(cfg) -> str:
    """``c.adapt.method`` (``"none"`` without an ``adapt`` section), checked."""
    section = cfg.get("adapt")
    method = section.get("method", "none") if section else "none"
    if method not in adapt.METHODS:
        raise ValueError(f"adapt.method {method!r} is not one of {adapt.METHODS}")
    return method


def has_target(cfg) -> bool:
    """Whether the recipe names a target domain (its test split is then the target's)."""
    section = cfg.get("adapt")
    return bool(section and section.get("target"))


def target_config(cfg):
    """A copy of ``cfg`` whose ``data`` reads the target domain (``c.adapt.target`` applied)."""
    target = cfg.copy_and_resolve_references()
    with target.unlocked():
        for key, value in cfg.adapt.target.items():
            if key not in target.data:
                raise KeyError(f"adapt.target.{key}: the data section has no {key!r} "
                               f"(keys: {sorted(target.data)})")
            target.data[key] = value
    return target


# ------------------------------------------------------------------ objects
def head(cfg):
    """The head the recipe trains (see the module doc)."""
    m = cfg.model
    common = {"pooling": m.get("pooling") or None, "dropout_rate": m.get("head_dropout", None)}
    task_rows = task_list(cfg)
    if task_rows is not None:
        return heads.MultiHead({t.name: heads.Classifier(t.num_classes, task=t.kind) for t in task_rows},
                               uncertainty=cfg.multitask.get("weighting", "fixed") == "uncertainty", **common)
    method = adapt_method(cfg)
    if method in ("none", "adabn"):
        return heads.Classifier(num_classes=m.num_classes, task=cfg.task, **common)
    a = cfg.adapt
    micro = cfg.optim.get("accumulate", 1) or 1
    return adapt.DomainClassifier(num_classes=m.num_classes, task=cfg.task, method=method,
                                  hidden=a.get("hidden", 256), total_calls=cfg.train.steps * micro,
                                  seed=cfg.seed, **common)


def loss_fns(cfg):
    """``(train_loss, eval_loss)``: the adaptation term is added to the training loss only."""
    task_rows = task_list(cfg)
    if task_rows is not None:
        base = multitask.loss_fn(task_rows, cfg.multitask.get("weighting", "fixed"))
    else:
        base = losses.for_task(cfg.task)
    term = adapt.term(adapt_method(cfg), temperature=cfg.adapt.get("temperature", 2.5)) \
        if cfg.get("adapt") else None
    train = regularizers.add_terms(base, (float(cfg.adapt.get("weight", 1.0)), term)) if term else base
    return train, base


def eval_step_kwargs(cfg) -> dict[str, Any]:
    task_rows = task_list(cfg)
    return {} if task_rows is None else {"label_key": multitask.label_keys(task_rows)}


def metrics_fn(cfg):
    """The evaluation hook for ``loop.evaluate`` (``None``: the single-task default)."""
    task_rows = task_list(cfg)
    return None if task_rows is None else multitask.metrics_fn(task_rows)


def with_task_columns(cfg, source, read):
    """A text source with one column per task, read from the same file by ``read``
    (``jaxfer.data.read_csv``/``read_jsonl``): class names -> ids (the task's
    ``label_names``, else their sorted set), numbers -> float32 (empty -> NaN)."""
    task_rows = task_list(cfg)
    if task_rows is None:
        return source
    d, columns = cfg.data, {}
    for t in task_rows:
        if t.kind == "multi_label":
            raise ValueError(f"task {t.name!r}: multi_label columns cannot be read from {d.kind} files")
        part = read(d.path, text=d.text, label=t.name, task=t.kind, label_names=t.label_names)
        columns[t.name] = part.columns["label"]
    return source.with_columns(**columns)

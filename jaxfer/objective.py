"""What a recipe optimises and how it is judged: config -> head, losses, evaluation hook.

Four shapes of recipe, each switched on by its config section:

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
  this one key;
* a sequence task (``c.task`` in :data:`jaxfer.tasks.SEQUENCE_KINDS`: ``causal_lm``,
  ``seq2seq``): no head (the model's own LM head), ``losses.for_task``, an evaluation
  that adds per-example token counts and, with a ``c.generate`` section
  (``max_new_tokens``, ``strategy``, ...), generated tokens, judged by
  :func:`jaxfer.metrics.sequence_report` (:mod:`jaxfer.train.sequence`).

* speech recognition (``c.task = "ctc"``, :data:`jaxfer.tasks.FRAME_KINDS`; ``c.data.vocab``
  the characters): a ``heads.CTCHead`` over the frames, ``losses.ctc``, an evaluation
  that adds each frame's argmax and reports WER/CER of the greedy transcripts
  (:mod:`jaxfer.train.transcription`).

``experiment`` calls these; they are the whole difference between the shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxfer import generation
from jaxfer import tasks as tasks_lib
from jaxfer.models import heads
from jaxfer.data.audio import CharVocab
from jaxfer.train import losses, sequence, transcription
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
    """The head the recipe trains (see the module doc); ``None`` for a sequence task."""
    if tasks_lib.is_sequence(cfg.task):
        return None
    m = cfg.model
    common = {"pooling": m.get("pooling") or None, "dropout_rate": m.get("head_dropout", None)}
    if cfg.task == "ctc":
        return heads.CTCHead(vocab(cfg).size, dropout_rate=common["dropout_rate"])
    task_rows = task_list(cfg)
    if task_rows is not None:
        return heads.MultiHead({t.name: heads.Classifier(t.num_classes, task=t.kind) for t in task_rows},
                               uncertainty=cfg.multitask.get("weighting", "fixed") == "uncertainty", **common)
    method = adapt_method(cfg)
    if method in ("none", "adabn"):
        return heads.Classifier(num_classes=m.num_classes, task=cfg.task, **common)
    a = cfg.adapt
    micro = cfg.optim.get("accumulate", 1) or 1
    if not cfg.train.steps:
        raise ValueError(f"adapt.method={method!r} schedules its gradient reversal over train.steps: give "
                         "train.steps (not train.epochs)")
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


def vocab(cfg) -> CharVocab:
    """The characters a CTC recipe transcribes (``c.data.vocab``)."""
    if not cfg.data.get("vocab"):
        raise ValueError("task 'ctc' needs data.vocab, the characters to transcribe")
    return CharVocab(cfg.data.vocab)


def eval_step_kwargs(cfg) -> dict[str, Any]:
    if cfg.task == "ctc":  # per-frame argmax ids, never logits
        return {"output_keys": transcription.OUTPUT_KEYS, "label_key": transcription.LABEL_KEYS}
    if tasks_lib.is_sequence(cfg.task):  # per-example sums and tokens, never logits
        generates = bool(cfg.get("generate") and cfg.generate.get("max_new_tokens"))
        return {"output_keys": sequence.output_keys(generates), "label_key": sequence.LABEL_KEYS}
    task_rows = task_list(cfg)
    return {} if task_rows is None else {"label_key": multitask.label_keys(task_rows)}


def eos_id(model) -> int:
    """The model config's EOS id (a text-to-text recipe needs one)."""
    eos = generation.settings_for(model.config, 1).eos_token_id
    if eos is None:
        raise ValueError("a text-to-text recipe needs an eos_token_id in the model config")
    return eos


def generate_settings(cfg, model) -> generation.Settings | None:
    """The recipe's ``generate`` section as :class:`jaxfer.generation.Settings` (None without one)."""
    g = cfg.get("generate")
    if not g or not g.get("max_new_tokens"):
        return None
    kw = {k: v for k, v in g.to_dict().items() if k != "max_new_tokens"}
    return generation.settings_for(model.config, g.max_new_tokens, **kw)


def eval_apply(cfg, apply_fn, model):
    """The evaluation's ``apply_fn``: for a sequence task with token counts and generated
    tokens added (:func:`jaxfer.train.sequence.eval_apply`), else ``apply_fn``."""
    if cfg.task == "ctc":
        return transcription.eval_apply(apply_fn)
    if not tasks_lib.is_sequence(cfg.task):
        return apply_fn
    return sequence.eval_apply(apply_fn, model.module, cfg.task, generate_settings(cfg, model))


def metrics_fn(cfg, *, model=None, data=None):
    """The evaluation hook for ``loop.evaluate`` (``None``: the single-task default). A
    sequence task's needs the ``model`` (its EOS id) and the ``data`` (label words' tokens)."""
    if cfg.task == "ctc":
        return transcription.metrics_fn(vocab(cfg))
    if tasks_lib.is_sequence(cfg.task):
        return sequence.metrics_fn(eos_id=eos_id(model), class_targets=getattr(data, "class_targets", None),
                                   label_names=getattr(data, "label_names", None))
    task_rows = task_list(cfg)
    return None if task_rows is None else multitask.metrics_fn(task_rows)


def with_task_columns(cfg, source, read):
    """A text source with one column per task, read from the same file by ``read``
    (``jaxfer.data.read_csv``/``read_jsonl``): class names -> ids (the task's
    ``label_names``, else their sorted set), numbers -> float32. Rows are matched
    by ``id`` (the row number); a row the task's read skips (an empty cell: no
    label for that task) holds ``-100`` (classification) or NaN."""
    task_rows = task_list(cfg)
    if task_rows is None:
        return source
    d, columns = cfg.data, {}
    for t in task_rows:
        if t.kind == "multi_label":
            raise ValueError(f"task {t.name!r}: multi_label columns cannot be read from {d.kind} files")
        part = read(d.path, text=d.text, label=t.name, task=t.kind, label_names=t.label_names)
        columns[t.name] = _by_id(part, source.columns["id"], t.kind)
    return source.with_columns(**columns)


def _by_id(part, ids: np.ndarray, kind: str) -> np.ndarray:
    """``part``'s labels at the rows ``ids`` (``part.columns["id"]`` ascending), missing ones
    ``-100`` (class ids) or NaN."""
    labels, have = part.columns["label"], part.columns["id"]
    out = np.full(len(ids), losses.IGNORE_INDEX if kind == "classification" else np.nan, labels.dtype)
    pos = np.minimum(np.searchsorted(have, ids), max(len(have) - 1, 0))
    found = (have[pos] == ids) if len(have) else np.zeros(len(ids), bool)
    out[found] = labels[pos[found]]
    return out

"""Task kinds: the one vocabulary heads, losses, metrics, exports and configs share.

A *kind* says what a head's outputs mean and so which loss trains it and which
metrics judge it:

=================  ==============================  ==========================  =========================
kind               outputs ``[B, n]``               loss                        metrics
=================  ==============================  ==========================  =========================
classification     logits of ``n`` classes          softmax cross-entropy       accuracy, macro-F1, ...
multi_label        logits of ``n`` yes/no labels    sigmoid cross-entropy       micro/macro-F1, ...
regression         ``n`` real values                squared error               mse, rmse, mae, r2
=================  ==============================  ==========================  =========================

Generative models have sequence kinds instead (:data:`SEQUENCE_KINDS`): their
outputs are the model's own token logits ``[B, T, vocab]`` (GPT-2, T5: no head is
attached) and their metrics come from per-example sums computed on the device
and from generated tokens (:mod:`jaxfer.train.sequence`), never from logits
gathered on the host:

=================  ==============================  ==========================  =========================
kind               targets                          loss                        metrics
=================  ==============================  ==========================  =========================
causal_lm          the next token (``labels`` or    token cross-entropy         perplexity, token
                   ``input_ids``, shifted)                                      accuracy; generated:
seq2seq            ``labels`` (decoder targets)     token cross-entropy         exact match, BLEU, class
                                                                                accuracy for label words
=================  ==============================  ==========================  =========================

A head may also score every frame of an utterance against an unaligned target
sequence (:data:`FRAME_KINDS`; speech recognition, ``heads.CTCHead``):

=================  ==============================  ==========================  =========================
kind               outputs / targets                loss                        metrics
=================  ==============================  ==========================  =========================
ctc                per-frame logits ``[B, T, V]``;  CTC (blank ``0``), frames   WER, CER of the greedy
                   ``labels [B, S]`` (``-100``      past ``frame_mask`` and     decoding (repeats
                   padding), no alignment           padded labels ignored       collapsed, blanks dropped)
=================  ==============================  ==========================  =========================

Every function that takes a ``task=`` argument (``heads.Classifier``,
``losses.for_task``, ``metrics.compute``, ``export``, a recipe's ``c.task``)
takes one of :data:`KINDS`.

A :class:`Task` is one named objective of a model: its kind, its width, the
batch column holding its labels, and its loss weight. A single-task model has
one task (``Task("label", ...)``, logits under ``outputs["logits"]``); a
multitask model (:mod:`jaxfer.transfer.multitask`) has several, each with its
head at ``classifier/<name>`` and its logits at ``outputs["logits"][name]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

KINDS = ("classification", "multi_label", "regression")
SEQUENCE_KINDS = ("causal_lm", "seq2seq")
FRAME_KINDS = ("ctc",)


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else a ``ValueError`` naming them."""
    if kind not in KINDS:
        raise ValueError(f"unknown task {kind!r}; choose one of {KINDS}")
    return kind


def check_head_kind(kind: str) -> str:
    """``kind`` if a head may have it (:data:`KINDS` or :data:`FRAME_KINDS`), else a ``ValueError``."""
    if kind not in KINDS + FRAME_KINDS:
        raise ValueError(f"unknown task {kind!r}; choose one of {KINDS + FRAME_KINDS}")
    return kind


def check_any_kind(kind: str) -> str:
    """``kind`` if it is a head, sequence or frame kind, else a ``ValueError`` naming them all."""
    if kind not in KINDS + SEQUENCE_KINDS + FRAME_KINDS:
        raise ValueError(f"unknown task {kind!r}; choose one of {KINDS + SEQUENCE_KINDS + FRAME_KINDS}")
    return kind


def is_sequence(kind: str) -> bool:
    """Whether ``kind`` is a sequence kind (a generative model's own logits, no head)."""
    return check_any_kind(kind) in SEQUENCE_KINDS


@dataclasses.dataclass(frozen=True)
class Task:
    """One objective of a model.

    Attributes:
      name: the head's name (``classifier/<name>`` in a multitask model) and the
        prefix of its metrics (``<name>/accuracy``).
      kind: one of :data:`KINDS`.
      num_classes: classes, labels or regression outputs.
      label: the batch column with its labels (default: ``name``). Rows without
        a label for this task carry ``-100`` (classification) or NaN (regression,
        multi-label): they get weight 0 in its loss and are left out of its metrics.
      weight: its fixed loss weight (ignored with uncertainty weighting).
      label_names: class names, for reports.
    """

    name: str
    kind: str = "classification"
    num_classes: int = 2
    label: str | None = None
    weight: float = 1.0
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        check_kind(self.kind)
        if not self.name or "/" in self.name:
            raise ValueError(f"task name must be non-empty and without '/', got {self.name!r}")
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(map(str, self.label_names)))


def check_names(tasks: Sequence[Task]) -> None:
    names = [t.name for t in tasks]
    if not names:
        raise ValueError("no tasks")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"task names must be unique, repeated: {duplicated}")

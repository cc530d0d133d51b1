"""Pure metric functions over numpy arrays.

Everything here takes host arrays (``np.ndarray`` or anything ``np.asarray``
accepts) and returns plain Python numbers, numpy arrays or JSON-ready dicts; no
JAX, no state. The training loop gathers per-example outputs on the host and
calls :func:`compute`.

Conventions:

* classification labels are integer class ids; rows whose label is negative
  (the ``-100`` padding convention of token tasks) are ignored. Soft or one-hot
  labels are reduced by ``argmax``.
* a confusion matrix has true classes on rows and predicted classes on columns.
* precision, recall and F1 of a class with nothing to divide by are 0.0.
* macro averages run over the classes that occur in the labels or in the
  predictions (as scikit-learn does by default), so a class absent from a small
  evaluation set does not pull the average down.
* multi-label predictions are ``logits > 0`` (probability above 0.5).
* regression and multi-label rows whose target holds a NaN have no label and
  are left out (as classification rows with a negative label).
* ``task`` is a kind from :data:`jaxfer.tasks.KINDS`; sequence kinds (causal LM,
  seq2seq) report :func:`sequence_report` from per-example sums and generated
  tokens (perplexity, token accuracy, exact match, BLEU, label-word accuracy);
  CTC (speech) reports :func:`transcription_report` (WER, CER) of greedy decodings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer import tasks


# ------------------------------------------------------------ classification
def accuracy(labels, preds) -> float:
    """Fraction of ``preds`` equal to ``labels`` (0.0 for no examples)."""
    labels, preds = np.asarray(labels).reshape(-1), np.asarray(preds).reshape(-1)
    return float(np.mean(labels == preds)) if labels.size else 0.0


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` int64 counts: row = true class, column = prediction."""
    labels = np.asarray(labels, np.int64).reshape(-1)
    preds = np.asarray(preds, np.int64).reshape(-1)
    for name, ids in (("label", labels), ("prediction", preds)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"{name} ids must lie in [0, {num_classes}), got "
                             f"[{ids.min()}, {ids.max()}]")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def precision_recall_f1(confusion) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(precision, recall, f1, support)`` from a confusion matrix."""
    confusion = np.asarray(confusion)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return precision, recall, f1, support


def _present(confusion: np.ndarray) -> np.ndarray:
    """Classes that occur among the labels or the predictions."""
    return (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0


def macro_f1(labels, preds, num_classes: int | None = None) -> float:
    """Unweighted mean F1 over the classes present in ``labels`` or ``preds``."""
    labels, preds = np.asarray(labels).reshape(-1), np.asarray(preds).reshape(-1)
    if labels.size == 0:
        return 0.0
    if num_classes is None:
        num_classes = int(max(labels.max(), preds.max())) + 1
    confusion = confusion_matrix(labels, preds, num_classes)
    f1 = precision_recall_f1(confusion)[2]
    return float(f1[_present(confusion)].mean())


def _class_names(num_classes: int, label_names: Sequence[str] | None) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(num_classes)]
    if len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label_names for {num_classes} classes")
    return [str(n) for n in label_names]


def classification_report(
    labels, logits_or_preds, label_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    Args:
      labels: integer class ids ``[N]``.
      logits_or_preds: logits/probabilities ``[N, C]`` (reduced by argmax) or
        predicted ids ``[N]``.
      label_names: class names, index = class id.
      num_classes: default the logits' width, else ``len(label_names)``, else
        the largest id seen plus one.

    Returns a JSON-ready dict: ``accuracy``, ``macro_f1``, ``num_examples``,
    ``per_class`` (``{name: {precision, recall, f1, support}}``) and
    ``confusion_matrix`` (nested lists, row = true class).
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(logits_or_preds)
    preds = scores.argmax(-1) if scores.ndim == 2 else scores.reshape(-1)
    preds = preds.astype(np.int64)
    if num_classes is None:
        if scores.ndim == 2:
            num_classes = scores.shape[-1]
        elif label_names is not None:
            num_classes = len(label_names)
        else:
            num_classes = int(max(labels.max(initial=0), preds.max(initial=0))) + 1
    names = _class_names(num_classes, label_names)
    confusion = confusion_matrix(labels, preds, num_classes)
    precision, recall, f1, support = precision_recall_f1(confusion)
    present = _present(confusion)
    return {
        "accuracy": accuracy(labels, preds),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "num_examples": int(labels.size),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        "confusion_matrix": confusion.tolist(),
    }


def majority_baseline(
    train_labels, eval_labels, num_classes: int, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The report of always predicting the most frequent training class.

    Ties go to the smallest class id. The chosen class is recorded as
    ``majority_class`` (its id) in the report.
    """
    counts = np.bincount(np.asarray(train_labels, np.int64).reshape(-1), minlength=num_classes)
    majority = int(counts.argmax())
    eval_labels = np.asarray(eval_labels).reshape(-1)
    preds = np.full(eval_labels.shape, majority, np.int64)
    report = classification_report(eval_labels, preds, label_names, num_classes=num_classes)
    report["majority_class"] = majority
    return report


# --------------------------------------------------------------- multi-label
def multi_label_report(
    labels, logits, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Micro and macro F1 of ``logits > 0`` against 0/1 ``labels`` ``[N, C]``.

    Macro F1 averages over the labels that occur in the targets or predictions.
    Also reports ``subset_accuracy`` (all labels of an example right) and
    per-label precision/recall/F1/support.
    """
    labels = np.asarray(labels) > 0.5
    preds = np.asarray(logits) > 0
    if labels.shape != preds.shape or labels.ndim != 2:
        raise ValueError(f"multi-label labels and logits must both be [N, C], got "
                         f"{labels.shape} and {preds.shape}")
    tp = (labels & preds).sum(0)
    fp = (~labels & preds).sum(0)
    fn = (labels & ~preds).sum(0)
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    present = (tp + fp + fn) > 0
    micro = float(_safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))
    names = _class_names(labels.shape[1], label_names)
    return {
        "micro_f1": micro,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float((labels == preds).all(1).mean()) if len(labels) else 0.0,
        "num_examples": int(len(labels)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, labels.sum(0))
        },
    }


# ---------------------------------------------------------------- regression
def _matched(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(targets, np.float64)
    p = np.asarray(predictions, np.float64)
    if p.size == t.size:
        p = p.reshape(t.shape)
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} do not match targets {t.shape}")
    return t, p


def mse(targets, predictions) -> float:
    """Mean squared error."""
    t, p = _matched(targets, predictions)
    return float(np.mean((p - t) ** 2)) if t.size else 0.0


def mae(targets, predictions) -> float:
    """Mean absolute error."""
    t, p = _matched(targets, predictions)
    return float(np.mean(np.abs(p - t))) if t.size else 0.0


def regression_report(targets, predictions) -> dict[str, Any]:
    """``mse``, ``rmse``, ``mae`` and ``r2`` (1 - SSE/SST; 0.0 when targets are constant)."""
    t, p = _matched(targets, predictions)
    sse = float(np.sum((p - t) ** 2))
    sst = float(np.sum((t - t.mean()) ** 2)) if t.size else 0.0
    m = mse(t, p)
    return {
        "mse": m,
        "rmse": float(np.sqrt(m)),
        "mae": mae(t, p),
        "r2": 1.0 - sse / sst if sst > 0 else 0.0,
        "num_examples": int(t.shape[0]) if t.ndim else 1,
    }


# ---------------------------------------------------------------- sequences
def perplexity(loss_sum, tokens) -> float:
    """``exp(sum of token losses / number of tokens)`` (natural log; inf past exp's range)."""
    total = float(np.sum(tokens))
    if total <= 0:
        raise ValueError("perplexity of no tokens")
    with np.errstate(over="ignore"):
        return float(np.exp(float(np.sum(loss_sum)) / total))


def sequence(tokens, eos_id: int | None = None) -> tuple[int, ...]:
    """A row of token ids as a tuple: ``-100`` (no target) dropped, cut before the first EOS."""
    out = []
    for t in np.asarray(tokens).reshape(-1).tolist():
        if eos_id is not None and t == eos_id:
            break
        if t != -100:
            out.append(int(t))
    return tuple(out)


def exact_match(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Fraction of predictions equal to their reference (token sequences; 0.0 for none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return float(np.mean([tuple(p) == tuple(r) for p, r in zip(predictions, references)])) if references else 0.0


def _ngrams(tokens: Sequence[int], n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    return counts


def bleu(predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]], max_order: int = 4,
         smooth: bool = True) -> float:
    """Corpus BLEU of token sequences (Papineni et al. 2002), one reference each.

    ``BP * exp(mean_n log p_n)``, ``p_n`` the clipped n-gram precision of order
    ``n = 1..max_order`` pooled over the corpus, ``BP = min(1, exp(1 - r / c))`` for
    reference length ``r`` and prediction length ``c``. ``smooth`` adds one to the
    matches and candidates of orders above 1 (Lin and Och's smoothing), so short
    outputs (label words) do not score 0 for lacking 4-grams. In [0, 1].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    matches, candidates = np.zeros(max_order), np.zeros(max_order)
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, max_order + 1):
            p, r = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r.get(g, 0)) for g, c in p.items())
            candidates[n - 1] += max(len(pred) - n + 1, 0)
    if pred_len == 0:
        return 0.0
    if smooth:
        matches[1:] += 1
        candidates[1:] += 1
    if (matches == 0).any():
        return 0.0
    log_precision = float(np.mean(np.log(matches / candidates)))
    brevity = min(1.0, float(np.exp(1.0 - ref_len / pred_len)))
    return brevity * float(np.exp(log_precision))


def sequence_report(outputs: dict[str, np.ndarray], *, eos_id: int | None = None,
                    class_targets: Sequence[Sequence[int]] | None = None,
                    label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a sequence task from per-example outputs gathered on the host.

    ``outputs`` (one row per example): ``loss`` and ``weight`` (sums of token losses
    and token counts), ``token_correct`` (targets the argmax predicts) -> ``perplexity``
    and ``token_accuracy``. With ``generated`` (new token ids) and ``target_ids``
    (reference tokens, ``-100`` padding) -> ``exact_match`` and ``bleu``, both up to
    the first ``eos_id``. With ``class_targets`` (one token sequence per class: the
    label words) and the class ids ``label`` -> a generated sequence is the class whose
    words it spells, else ``"(other)"``: ``accuracy``, ``macro_f1``, the per-class
    report (an ``(other)`` row) and ``other_rate``.
    """
    report: dict[str, Any] = {}
    if "weight" in outputs and float(np.sum(outputs["weight"])) > 0:
        report["perplexity"] = perplexity(outputs["loss"], outputs["weight"])
        if "token_correct" in outputs:
            report["token_accuracy"] = float(np.sum(outputs["token_correct"]) / np.sum(outputs["weight"]))
    if "generated" not in outputs:
        return report
    preds = [sequence(row, eos_id) for row in outputs["generated"]]
    if "target_ids" in outputs:
        refs = [sequence(row, eos_id) for row in outputs["target_ids"]]
        report["exact_match"] = exact_match(preds, refs)
        report["bleu"] = bleu(preds, refs)
    if class_targets is not None and "label" in outputs:
        lookup = {tuple(t): i for i, t in enumerate(class_targets)}
        other = len(class_targets)
        pred_ids = np.array([lookup.get(p, other) for p in preds], np.int64)
        names = list(label_names) if label_names is not None else [str(i) for i in range(other)]
        labels = np.asarray(outputs["label"]).astype(np.int64).reshape(-1)
        keep = labels >= 0
        full = classification_report(labels[keep], pred_ids[keep], names + ["(other)"], num_classes=other + 1)
        report.update({k: v for k, v in full.items() if k != "num_examples"})
        # macro-F1 over the real classes (as a classifier's), an "(other)" output counting as a miss
        confusion = np.asarray(full["confusion_matrix"])
        f1 = precision_recall_f1(confusion)[2][:other]
        present = _present(confusion)[:other]
        report["macro_f1"] = float(f1[present].mean()) if present.any() else 0.0
        report["other_rate"] = float(np.mean(pred_ids[keep] == other)) if keep.any() else 0.0
    return report


# ------------------------------------------------------------ transcription
def ctc_greedy(frame_ids, frame_mask=None, blank_id: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of per-frame argmax ids ``(B, T)``: frames past ``frame_mask``
    dropped, runs of the same id collapsed to one, then blanks dropped (``a a _ a`` -> ``a a``)."""
    ids = np.asarray(frame_ids)
    mask = np.ones(ids.shape, bool) if frame_mask is None else np.asarray(frame_mask) > 0
    out = []
    for row, m in zip(ids, mask):
        row = row[m]
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(t) for t in row[keep] if t != blank_id))
    return out


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions turning ``a`` into ``b``."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rate(predictions: Sequence[Sequence[Any]], references: Sequence[Sequence[Any]]) -> float:
    """Corpus error rate: ``sum(edit_distance(p, r)) / sum(len(r))`` (may exceed 1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("error rate against empty references")
    return sum(edit_distance(p, r) for p, r in zip(predictions, references)) / total


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate of texts (words split on whitespace)."""
    return error_rate([p.split() for p in predictions], [r.split() for r in references])


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate of texts (spaces count as characters, runs of them as one)."""
    return error_rate([" ".join(p.split()) for p in predictions], [" ".join(r.split()) for r in references])


def transcription_report(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """``wer``, ``cer``, ``sentence_accuracy`` (exact transcripts) and ``num_examples``."""
    return {"wer": wer(predictions, references), "cer": cer(predictions, references),
            "sentence_accuracy": float(np.mean([" ".join(p.split()) == " ".join(r.split())
                                                for p, r in zip(predictions, references)])),
            "num_examples": len(references)}


# ------------------------------------------------------------------ dispatch
def compute(task: str, logits, labels, label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Task metrics from model outputs and labels.

    * ``"classification"``: logits ``[..., C]``; labels ids ``[...]`` or soft/one-hot
      ``[..., C]`` (argmax). Leading dimensions are flattened (token tasks), and
      rows with a negative label are dropped.
    * ``"multi_label"``: logits and 0/1 labels ``[N, C]``.
    * ``"regression"``: predictions and targets of matching size.

    Multi-label and regression rows with a NaN target are dropped.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    tasks.check_kind(task)
    if task == "classification":
        if labels.ndim == logits.ndim:
            labels = labels.argmax(-1)
        scores = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        keep = labels >= 0
        return classification_report(labels[keep], scores[keep], label_names,
                                     num_classes=scores.shape[-1])
    labels = labels.astype(np.float64)
    keep = ~np.isnan(labels.reshape(len(labels), -1)).any(1)
    if task == "multi_label":
        return multi_label_report(labels[keep], logits[keep], label_names)
    return regression_report(labels.reshape(len(labels), -1)[keep],
                             logits.reshape(len(logits), -1)[keep])


# ----------------------------------------------------------------- rendering
def format_report(report: dict[str, Any]) -> str:
    """A plain-text rendering: scalar metrics, the per-class table, the confusion matrix."""
    lines = [f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}"
             for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    per_class = report.get("per_class")
    if per_class:
        width = max(12, *(len(n) for n in per_class))
        lines += ["", f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
        for name, row in per_class.items():
            lines.append(f"{name:<{width}} {row['precision']:>9.4f} {row['recall']:>9.4f} "
                         f"{row['f1']:>9.4f} {row['support']:>9d}")
    confusion = report.get("confusion_matrix")
    if confusion:
        names = list(per_class) if per_class else [str(i) for i in range(len(confusion))]
        cell = max(7, *(len(n) for n in names), *(len(str(c)) for row in confusion for c in row))
        head = max(10, *(len(n) for n in names))
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * head + " " + " ".join(f"{n:>{cell}}" for n in names)]
        for name, row in zip(names, confusion):
            lines.append(f"{name:<{head}} " + " ".join(f"{c:>{cell}}" for c in row))
    return "\n".join(lines)

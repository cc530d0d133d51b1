"""Loss functions for the train and eval steps: ``loss_fn(outputs, batch) -> (losses, weights)``.

Every builder here returns a function of the model's output dict and the batch
that gives two arrays of the same shape, per example ``[B]`` or per token
``[B, T]``: the unreduced losses and their weights. The step reduces them as
``sum(losses * weights) / sum(weights)`` after multiplying ``weights`` by the
batch's ``mask`` (zero for padding rows), so a loss never averages by itself.
That keeps gradient accumulation, padded evaluation batches and data parallel
runs exact: the total weight is only known once every part has been summed.

    loss_fn = softmax_cross_entropy(label_smoothing=0.1)
    loss_fn = for_task("regression")          # a kind from jaxfer.tasks.KINDS
    loss_fn = for_task("causal_lm")           # or a sequence kind: per-token losses [B, T]
    loss_fn = for_task("ctc")                 # speech: per-utterance CTC, weighted by characters

Rows whose label is missing get weight 0: an integer class id equal to
``ignore_index`` (-100), or a float target that is NaN (regression, multi-label).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxfer import tasks

LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, Any]], tuple[jax.Array, jax.Array]]
IGNORE_INDEX = -100  # the PyTorch / Hugging Face convention for "no label here"


def softmax_cross_entropy(label_smoothing: float = 0.0, ignore_index: int | None = IGNORE_INDEX,
                          logits_key: str = "logits", label_key: str = "label") -> LossFn:
    """Softmax cross-entropy over the last axis of ``outputs[logits_key]``.

    Labels are integer class ids of shape ``logits.shape[:-1]`` (``[B]`` for
    sequence classification, ``[B, T]`` for token classification), or float
    target distributions of the logits' own shape (one-hot or soft, as mixup
    makes). Integer labels equal to ``ignore_index`` get weight 0 (and a finite
    loss, so ``0 * loss`` stays 0); any other id outside ``[0, num_classes)``
    gets a NaN loss, which the train step's non-finite guard stops on.

    ``label_smoothing`` mixes the target with the uniform distribution:
    ``(1 - s) * target + s / num_classes`` (as ``torch.nn.CrossEntropyLoss``).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    def loss_fn(outputs, batch):
        logits = outputs[logits_key]
        labels = jnp.asarray(batch[label_key])
        num_classes = logits.shape[-1]
        if labels.shape == logits.shape and jnp.issubdtype(labels.dtype, jnp.floating):
            targets = labels.astype(logits.dtype)
            weights = jnp.ones(logits.shape[:-1], jnp.float32)
        elif labels.shape == logits.shape[:-1]:
            valid = (labels != ignore_index) if ignore_index is not None else jnp.ones(labels.shape, bool)
            # an ignored label must still index a real class, or one_hot gives all zeros
            # and the smoothed loss would differ from 0 * finite
            targets = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=logits.dtype)
            weights = valid.astype(jnp.float32)
        else:
            raise ValueError(f"labels of shape {labels.shape} fit neither integer ids of shape "
                             f"{logits.shape[:-1]} nor float targets of shape {logits.shape}")
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
        if not jnp.issubdtype(labels.dtype, jnp.floating):
            # a class id outside [0, num_classes) has no target: NaN, never a finite wrong loss
            outside = valid & ((labels < 0) | (labels >= num_classes))
            losses = jnp.where(outside, jnp.nan, losses)
        return losses, weights

    return loss_fn


def _float_targets(labels, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float targets shaped like ``like``, NaN replaced by 0, and the per-row weight
    (0 where any target of the row is NaN: the row has no label)."""
    targets = jnp.asarray(labels, like.dtype).reshape(like.shape)
    missing = jnp.isnan(targets)
    row_missing = missing.any(-1) if targets.ndim > 1 else missing
    return jnp.where(missing, 0.0, targets), (~row_missing).astype(jnp.float32)


def sigmoid_binary_cross_entropy(logits_key: str = "logits", label_key: str = "label") -> LossFn:
    """Multi-label: sigmoid cross-entropy per label with 0/1 (or soft) targets, mean over labels.

    ``losses`` has shape ``logits.shape[:-1]``: one value per example, the mean
    over its ``num_labels`` binary problems.
    """

    def loss_fn(outputs, batch):
        logits = outputs[logits_key]
        labels, weights = _float_targets(batch[label_key], logits)
        losses = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
        return losses, weights.reshape(losses.shape)

    return loss_fn


def mean_squared_error(logits_key: str = "logits", label_key: str = "label") -> LossFn:
    """Regression: squared error, mean over the output dimension (``[B, n] -> [B]``).

    Labels of shape ``[B]`` are reshaped to ``[B, 1]`` for single-output heads.
    """

    def loss_fn(outputs, batch):
        preds = outputs[logits_key]
        targets, weights = _float_targets(batch[label_key], preds)
        losses = ((preds - targets) ** 2).mean(-1)
        return losses, weights.reshape(losses.shape)

    return loss_fn


def token_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                        ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """``(losses, weights)`` of integer targets ``labels [..., T]`` under ``logits [..., T, V]``.

    ``-log softmax(logits)[label]`` without a one-hot ``[..., T, V]`` array (vocabularies
    are large); with smoothing ``s``: ``(1 - s) * nll + s * mean_v(-log p_v)``, the
    cross-entropy against ``(1 - s) * onehot + s / V``. ``ignore_index`` targets weigh 0.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    losses = log_z - picked
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (log_z - logits.mean(-1))
    return losses, valid.astype(jnp.float32)


def shifted_targets(batch: Mapping[str, Any], label_key: str = "labels") -> jax.Array:
    """Next-token targets ``[B, T - 1]`` of a causal LM: ``labels[:, 1:]`` (``-100`` where
    no loss is wanted: prompt, padding), else ``input_ids[:, 1:]`` with padding
    (``attention_mask == 0``) set to ``-100``."""
    if label_key in batch:
        return jnp.asarray(batch[label_key])[:, 1:]
    targets = jnp.asarray(batch["input_ids"])[:, 1:]
    if "attention_mask" in batch:
        targets = jnp.where(jnp.asarray(batch["attention_mask"])[:, 1:] > 0, targets, IGNORE_INDEX)
    return targets


def causal_lm(label_smoothing: float = 0.0, logits_key: str = "logits", label_key: str = "labels") -> LossFn:
    """Causal language modelling: position ``t`` predicts token ``t + 1``.

    ``losses, weights`` are ``[B, T - 1]``: the token cross-entropy of
    ``logits[:, :-1]`` against :func:`shifted_targets` (HF's ``labels`` convention:
    ``labels`` may equal ``input_ids``, the shift happens here). The step's
    weighted mean is the mean over every target token of the batch.
    """

    def loss_fn(outputs, batch):
        return token_cross_entropy(outputs[logits_key][:, :-1], shifted_targets(batch, label_key), label_smoothing)

    return loss_fn


def seq2seq(label_smoothing: float = 0.0, logits_key: str = "logits", label_key: str = "labels") -> LossFn:
    """Teacher-forced sequence to sequence: the decoder's ``logits [B, T, V]`` against the
    target tokens ``labels [B, T]`` (``-100`` padding), which the model also reads,
    shifted right, as its decoder inputs. ``losses, weights`` are ``[B, T]``."""

    def loss_fn(outputs, batch):
        return token_cross_entropy(outputs[logits_key], batch[label_key], label_smoothing)

    return loss_fn


def ctc(blank_id: int = 0, logits_key: str = "logits", label_key: str = "labels",
        frames_key: str = "frame_mask") -> LossFn:
    """Connectionist temporal classification (``optax.ctc_loss``): ``-log p(labels | frames)``
    summed over every alignment of the target characters to the frames (blank ``blank_id``).

    ``outputs[logits_key]`` ``(B, T, V)`` are per-frame logits, ``outputs[frames_key]``
    ``(B, T)`` marks real frames (all frames without it), ``batch[label_key]`` ``(B, S)``
    the targets, ``-100`` after each row's end. ``losses`` are per utterance ``[B]``
    (HF's ``ctc_loss_reduction="sum"`` per row), each weighted by its number of target
    characters so the step's mean is the loss per character; an utterance with no target
    or too few frames for its target (an infinite loss) gets weight 0 and loss 0 (HF's
    ``ctc_zero_infinity``), so one bad clip cannot make a step non-finite.
    """

    def loss_fn(outputs, batch):
        logits = outputs[logits_key].astype(jnp.float32)
        labels = jnp.asarray(batch[label_key])
        frames = outputs.get(frames_key)
        logit_pad = jnp.zeros(logits.shape[:2], jnp.float32) if frames is None else \
            1.0 - jnp.asarray(frames, jnp.float32)
        valid = labels != IGNORE_INDEX
        label_pad = 1.0 - valid.astype(jnp.float32)
        losses = optax.ctc_loss(logits, logit_pad, jnp.where(valid, labels, 0), label_pad, blank_id=blank_id)
        chars = valid.sum(-1).astype(jnp.float32)
        # an alignment needs a frame per character and a blank between repeated characters
        repeats = (valid[:, 1:] & (labels[:, 1:] == labels[:, :-1])).sum(-1)
        ok = (jnp.sum(1.0 - logit_pad, -1) >= chars + repeats) & (chars > 0) & jnp.isfinite(losses)
        return jnp.where(ok, losses / jnp.maximum(chars, 1.0), 0.0), jnp.where(ok, chars, 0.0)

    return loss_fn


_BY_TASK: dict[str, Callable[..., LossFn]] = {
    "classification": softmax_cross_entropy,
    "multi_label": sigmoid_binary_cross_entropy,
    "regression": mean_squared_error,
    "causal_lm": causal_lm,
    "seq2seq": seq2seq,
    "ctc": ctc,
}
assert tuple(_BY_TASK) == tasks.KINDS + tasks.SEQUENCE_KINDS + tasks.FRAME_KINDS


def for_task(task: str, **kwargs: Any) -> LossFn:
    """The loss for a task kind (``"classification"``, ``"multi_label"``, ``"regression"``,
    or a sequence kind: ``"causal_lm"``, ``"seq2seq"``).

    ``kwargs`` go to the builder (``label_smoothing=0.1`` for classification and the
    sequence kinds, ``logits_key``/``label_key`` for any).
    """
    return _BY_TASK[tasks.check_any_kind(task)](**kwargs)

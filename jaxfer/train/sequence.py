"""Sequence tasks (``causal_lm``, ``seq2seq``) in evaluation: per-example numbers computed on
the device, so no ``[N, T, vocab]`` logits ever reach the host.

    apply_fn = sequence.eval_apply(model_apply(model), model.module, "seq2seq", generate=settings)
    eval_step = make_eval_step(apply_fn, losses.for_task("seq2seq"), output_keys=sequence.output_keys(settings),
                               label_key=sequence.LABEL_KEYS)
    report = evaluate(state, eval_step, batches, metrics_fn=sequence.metrics_fn(eos_id=1))

The step already returns, per example, the summed token loss (``loss``) and the
number of target tokens (``weight``). In evaluation (``train=False``) the wrapped
``apply_fn`` adds

* ``token_correct``: how many of the example's targets the argmax predicts (the
  loss's own targets: :func:`jaxfer.train.losses.shifted_targets` for a causal LM);
* ``generated`` (when ``generate`` settings are given): the model's continuation,
  ``(B, max_new_tokens)`` token ids from :mod:`jaxfer.generation`, of the encoder
  inputs (seq2seq) or of the prompt alone (causal LM: ``prompt_ids``/``prompt_mask``,
  see :func:`jaxfer.data.text.tokenize_text_to_text`).

:func:`metrics_fn` turns those, with the reference ``target_ids`` and the class ids
``label``, into perplexity, token accuracy, exact match, BLEU and -- for label
words as targets -- accuracy and macro-F1 comparable with a classifier head's
(:func:`jaxfer.metrics.sequence_report`). Training is untouched: with ``train=True``
the wrapper is the plain ``apply_fn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxfer import generation, metrics, tasks
from jaxfer.train.losses import shifted_targets

LABEL_KEYS = ("label", "target_ids")  # batch columns the eval step hands to the metrics


def output_keys(generate: generation.Settings | bool | None = None) -> tuple[str, ...]:
    """The per-example outputs :func:`eval_apply` adds (for ``make_eval_step``): ``generated``
    too when it generates (``generate``: its settings, or just whether)."""
    return ("token_correct",) + (("generated",) if generate not in (None, False) else ())


def _correct(task: str, logits: jax.Array, batch) -> jax.Array:
    if task == "causal_lm":
        logits, targets = logits[:, :-1], shifted_targets(batch)
    else:
        targets = jnp.asarray(batch["labels"])
    hit = (jnp.argmax(logits, axis=-1) == targets) & (targets != -100)
    return hit.sum(axis=-1).astype(jnp.float32)


def eval_apply(apply_fn, module: Any, task: str, generate: generation.Settings | None = None):
    """``apply_fn`` plus, in evaluation, ``token_correct`` and ``generated`` (see the module doc)."""
    if not tasks.is_sequence(task):
        raise ValueError(f"eval_apply is for sequence tasks {tasks.SEQUENCE_KINDS}, got {task!r}")
    run = None if generate is None else generation.compiled(module, generate)

    def apply(variables, batch, *, train: bool, rng=None):
        outputs, state = apply_fn(variables, batch, train=train, rng=rng)
        if train:
            return outputs, state
        outputs = {**outputs, "token_correct": _correct(task, outputs["logits"], batch)}
        if run is not None:
            if task == "causal_lm":
                ids, mask = batch["prompt_ids"], batch["prompt_mask"]
            else:
                ids, mask = batch["input_ids"], batch["attention_mask"]
            key = jax.random.key(0) if rng is None else rng
            outputs["generated"] = run(variables["params"], jnp.asarray(ids, jnp.int32),
                                       jnp.asarray(mask, jnp.int32), key)["tokens"]
        return outputs, state

    return apply


def metrics_fn(*, eos_id: int | None, class_targets: Sequence[Sequence[int]] | None = None,
               label_names: Sequence[str] | None = None):
    """``outputs -> report`` for :func:`jaxfer.train.loop.evaluate` (:func:`jaxfer.metrics.sequence_report`)."""

    def fn(outputs):
        return metrics.sequence_report(outputs, eos_id=eos_id, class_targets=class_targets, label_names=label_names)

    return fn

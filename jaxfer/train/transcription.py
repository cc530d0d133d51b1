"""CTC (speech recognition) in evaluation: greedy decoding on the device, WER/CER on the host.

    eval_step = make_eval_step(transcription.eval_apply(apply_fn), losses.for_task("ctc"),
                               output_keys=transcription.OUTPUT_KEYS, label_key=transcription.LABEL_KEYS)
    report = evaluate(state, eval_step, batches, metrics_fn=transcription.metrics_fn(vocab))

In evaluation the wrapped ``apply_fn`` adds ``frame_ids`` ``(B, T)``, the argmax id of every
frame (int32: never the ``[N, T, vocab]`` logits on the host); :func:`metrics_fn` collapses
repeats, drops blanks (:func:`jaxfer.metrics.ctc_greedy`), spells the ids with the
vocabulary and scores them against the reference ``labels``
(:func:`jaxfer.metrics.transcription_report`: WER, CER, sentence accuracy) next to the
loss per character. Training is untouched.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxfer import metrics
from jaxfer.data.audio import CharVocab

OUTPUT_KEYS = ("frame_ids", "frame_mask")
LABEL_KEYS = ("labels",)


def eval_apply(apply_fn):
    """``apply_fn`` plus, in evaluation, ``frame_ids``: the argmax of each frame's logits."""

    def apply(variables, batch, *, train: bool, rng=None):
        outputs, state = apply_fn(variables, batch, train=train, rng=rng)
        if train:
            return outputs, state
        return {**outputs, "frame_ids": jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)}, state

    return apply


def transcripts(frame_ids, frame_mask, vocab: CharVocab, blank_id: int = 0) -> list[str]:
    """Greedy CTC transcripts of per-frame ids."""
    return [vocab.decode(ids) for ids in metrics.ctc_greedy(frame_ids, frame_mask, blank_id)]


def metrics_fn(vocab: CharVocab, blank_id: int = 0):
    """``outputs -> report`` for :func:`jaxfer.train.loop.evaluate`: WER, CER, sentence accuracy
    (``evaluate`` adds the loss per character)."""

    def fn(outputs):
        hyps = transcripts(outputs["frame_ids"], outputs["frame_mask"], vocab, blank_id)
        refs = [vocab.decode([int(i) for i in row if i >= 0]) for row in np.asarray(outputs["labels"])]
        return metrics.transcription_report(hyps, refs)

    return fn

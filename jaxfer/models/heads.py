"""Task heads that attach to any backbone, and the :class:`TaskModel` that joins them.

A backbone is any Linen module whose ``__call__`` returns a dict with some of
``last_hidden_state`` ``(B, T, H)`` (or ``(B, H, W, C)``), ``pooler_output`` and
``hidden_states``, and takes a ``train`` (or ``deterministic``) keyword.
A head reads that dict::

    Classifier(num_classes=3)                         # pooling from the family
    Classifier(num_classes=5, pooling="mean")         # masked mean over tokens
    TanhClassifier(num_classes=3)                     # dense + tanh + out_proj (HF RoBERTa's head)
    TokenClassifier(num_classes=9)                    # per-token logits
    regressor(1), multi_label(4)                      # same Dense, other task kind
    MultiHead({"sentiment": Classifier(3), "confidence": regressor(1)})
    CTCHead(vocab_size=30)                            # per-frame character logits (speech, task "ctc")
    UtteranceClassifier(num_classes=10)               # projector, masked mean over frames, Dense

``task`` is a kind from :data:`jaxfer.tasks.KINDS`; it changes which loss and
metrics go with the head (``losses.for_task``, ``metrics.compute``), not its outputs.

``TaskModel(backbone, head, prefix="bert")`` lays params out like HF task models,
``{"bert": backbone params, "classifier": head params}``, so checkpoints with
keys ``bert.*`` and ``classifier.*`` load with their head. The head owns
``kernel``/``bias`` directly (``classifier/kernel``), or under ``dense_name``
(``classifier/1/kernel`` for HF ResNet's ``Sequential(Flatten, Linear)``).
A head returns its logits, or a dict of outputs that ``TaskModel`` merges into
the backbone's (``MultiHead``: ``{"logits": {task: logits}}``; the heads of
:mod:`jaxfer.transfer.adapt` add ``features`` and ``domain_logits``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfer import tasks

POOLINGS = ("cls", "mean", "pooler", "tokens", "last")


def pool(outputs: Mapping[str, jax.Array], pooling: str, attention_mask: jax.Array | None = None) -> jax.Array:
    """Backbone outputs -> features for a head.

    ``"cls"``: ``last_hidden_state[:, 0]``; ``"mean"``: mean of ``last_hidden_state``
    over tokens weighted by ``attention_mask`` (all tokens when ``None``);
    ``"pooler"``: ``pooler_output`` flattened to ``(B, -1)``; ``"tokens"``:
    ``last_hidden_state`` unchanged (token classification); ``"last"``: the last
    token whose ``attention_mask`` is 1 (decoder-only models such as GPT-2, whose
    last token has seen the whole text; padding on either side).
    """
    if pooling == "pooler":
        if "pooler_output" not in outputs:
            raise KeyError("pooling='pooler' but the backbone returns no 'pooler_output'")
        x = outputs["pooler_output"]
        return x.reshape(x.shape[0], -1)
    h = outputs["last_hidden_state"]
    if pooling == "cls":
        return h[:, 0]
    if pooling == "tokens":
        return h
    if pooling == "last":
        if attention_mask is None:
            return h[:, -1]
        m = jnp.asarray(attention_mask) > 0
        last = jnp.max(jnp.where(m, jnp.arange(h.shape[1]), 0), axis=1)
        return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        if attention_mask is None:
            return h.mean(axis=1)
        m = jnp.asarray(attention_mask, h.dtype)[..., None]
        return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class Classifier(nn.Module):
    """``dropout -> Dense(num_classes)`` on pooled backbone features.

    Attributes:
      num_classes: outputs (classes, labels, or regression targets).
      pooling: one of :data:`POOLINGS`; ``None`` takes the family default when
        built through :func:`jaxfer.weights.load` (``"cls"`` otherwise).
      dropout_rate: before the Dense, like HF; ``None`` takes the checkpoint
        config's ``classifier_dropout``/``hidden_dropout_prob`` through ``load``.
      task: a kind from :data:`jaxfer.tasks.KINDS` (``"classification"``,
        ``"multi_label"``, ``"regression"``); it does not change the logits.
      dense_name: nest the Dense under this name (``"1"`` for HF ResNet).
      init_std: std of the normal kernel init (HF ``initializer_range``); bias 0.
    """

    num_classes: int
    pooling: str | None = None
    dropout_rate: float | None = None
    task: str = "classification"
    dense_name: str | None = None
    init_std: float = 0.02

    def __post_init__(self):
        tasks.check_head_kind(self.task)
        super().__post_init__()

    @nn.compact
    def __call__(self, outputs: Mapping[str, jax.Array], attention_mask=None, *, train: bool = False):
        return self.project(pool(outputs, self.pooling or "cls", attention_mask), train=train)

    def project(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Dropout and the Dense on pooled features ``x`` (called inside ``__call__``)."""
        x = nn.Dropout(self.dropout_rate or 0.0)(x, deterministic=not train)
        init = nn.initializers.normal(self.init_std)
        if self.dense_name is not None:
            return nn.Dense(self.num_classes, kernel_init=init, name=self.dense_name)(x)
        kernel = self.param("kernel", init, (x.shape[-1], self.num_classes), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class TanhClassifier(Classifier):
    """``dropout -> Dense(H) -> tanh -> dropout -> Dense(num_classes)`` on pooled features:
    HF's ``RobertaClassificationHead`` (params ``dense/*`` and ``out_proj/*``); it pools
    the first token by default."""

    pooling: str | None = "cls"

    @nn.compact
    def __call__(self, outputs: Mapping[str, jax.Array], attention_mask=None, *, train: bool = False):
        x = pool(outputs, self.pooling or "cls", attention_mask)
        init = nn.initializers.normal(self.init_std)
        x = nn.Dropout(self.dropout_rate or 0.0)(x, deterministic=not train)
        x = jnp.tanh(nn.Dense(x.shape[-1], kernel_init=init, name="dense")(x))
        x = nn.Dropout(self.dropout_rate or 0.0)(x, deterministic=not train)
        return nn.Dense(self.num_classes, kernel_init=init, name="out_proj")(x)


class TokenClassifier(Classifier):
    """Per-token logits ``(B, T, num_classes)`` (HF ``*ForTokenClassification``)."""

    pooling: str | None = "tokens"


class CTCHead(Classifier):
    """Per-frame logits ``(B, T, vocab_size)`` for CTC (HF ``Wav2Vec2ForCTC``'s ``lm_head``, with
    its ``final_dropout``); ``blank_id`` is the CTC blank (HF's ``pad_token_id``). Its task
    kind is ``"ctc"`` (:data:`jaxfer.tasks.FRAME_KINDS`): loss ``losses.ctc``, greedy decoding
    and WER/CER (:mod:`jaxfer.train.transcription`)."""

    pooling: str | None = "tokens"
    task: str = "ctc"
    blank_id: int = 0


class UtteranceClassifier(nn.Module):
    """HF's ``Wav2Vec2ForSequenceClassification`` head: ``projector`` (Dense to
    ``projection_size``) on every frame, the mean over real frames (the backbone's
    ``frame_mask``; all frames without one), dropout, then ``out`` (Dense to ``num_classes``)."""

    num_classes: int
    projection_size: int = 256
    dropout_rate: float | None = None
    task: str = "classification"
    init_std: float = 0.02
    pooling: str | None = "mean"  # over frames, fixed

    def __post_init__(self):
        tasks.check_kind(self.task)
        super().__post_init__()

    @nn.compact
    def __call__(self, outputs: Mapping[str, jax.Array], attention_mask=None, *, train: bool = False):
        init = nn.initializers.normal(self.init_std)
        h = nn.Dense(self.projection_size, kernel_init=init, name="projector")(outputs["last_hidden_state"])
        x = pool({"last_hidden_state": h}, "mean", outputs.get("frame_mask"))
        x = nn.Dropout(self.dropout_rate or 0.0)(x, deterministic=not train)
        return nn.Dense(self.num_classes, kernel_init=init, name="out")(x)


def regressor(num_outputs: int = 1, **kw) -> Classifier:
    return Classifier(num_outputs, task="regression", **kw)


def multi_label(num_labels: int, **kw) -> Classifier:
    return Classifier(num_labels, task="multi_label", **kw)


class MultiHead(nn.Module):
    """Several heads on one backbone: ``heads[name]`` under ``classifier/<name>``.

    Returns ``{"logits": {name: logits}}``; with ``uncertainty=True`` also
    ``{"log_var": {name: s}}``, one learned scalar per head (``classifier/log_var/<name>``,
    initialised to 0) for uncertainty-weighted losses (see
    :func:`jaxfer.transfer.multitask.loss_fn`). A head's ``pooling=None`` /
    ``dropout_rate=None`` take this module's values (which ``load`` fills in
    from the family and checkpoint config like a single head's).
    """

    heads: Mapping[str, nn.Module]
    pooling: str | None = None
    dropout_rate: float | None = None
    uncertainty: bool = False

    @nn.compact
    def __call__(self, outputs: Mapping[str, jax.Array], attention_mask=None, *, train: bool = False):
        logits = {}
        for name, head in self.heads.items():
            changes = {k: getattr(self, k) for k in ("pooling", "dropout_rate")
                       if getattr(head, k, "") is None}
            head = head.clone(parent=self, name=name, **changes)
            logits[name] = head(outputs, attention_mask, **train_kwarg(head, train))
        result = {"logits": logits}
        if self.uncertainty:
            result["log_var"] = self.param(
                "log_var", lambda _: {name: jnp.zeros((), jnp.float32) for name in self.heads})
        return result


def train_kwarg(module: nn.Module, train: bool) -> dict[str, bool]:
    """``{"train": train}`` or ``{"deterministic": not train}``, whichever ``module`` takes."""
    params = inspect.signature(type(module).__call__).parameters
    if "train" in params:
        return {"train": train}
    if "deterministic" in params:
        return {"deterministic": not train}
    return {}


def _accepted(module: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword ``inputs`` that ``module.__call__`` takes (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(type(module).__call__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in params}


class TaskModel(nn.Module):
    """``backbone`` under ``prefix`` and ``head`` under ``head_name``.

    ``__call__(*args, train=False, **inputs)`` passes to the backbone the inputs it
    takes (a tokenizer's ``token_type_ids`` do not reach GPT-2 or T5) and returns
    its output dict plus ``logits`` (or plus the head's own dict of outputs); the
    head sees ``inputs["attention_mask"]`` when given by keyword (for ``"mean"`` pooling).
    """

    backbone: nn.Module
    head: nn.Module
    prefix: str = "bert"
    head_name: str = "classifier"

    @nn.compact
    def __call__(self, *args, train: bool = False, **inputs: Any):
        backbone = self.backbone.clone(parent=self, name=self.prefix)
        head = self.head.clone(parent=self, name=self.head_name)
        outputs = dict(backbone(*args, **_accepted(self.backbone, inputs), **train_kwarg(self.backbone, train)))
        out = head(outputs, inputs.get("attention_mask"), **train_kwarg(self.head, train))
        if isinstance(out, Mapping):
            outputs.update(out)
        else:
            outputs["logits"] = out
        return outputs

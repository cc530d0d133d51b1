"""Named rule presets for parameter-efficient tuning: which leaves train, in the one rule language.

Each returns ordered rules (first match wins, ``None`` = frozen) for
:func:`jaxfer.masks.trainable_mask`, :func:`jaxfer.optim.build` and ``jf.explain``;
``head`` names the new task head, which trains in every preset (``None``: no head rule)::

    bitfit()       # BitFit (Ben Zaken et al. 2022): every bias + the head
    norm_tuning()  # LayerNorm tuning: normalisation scales/biases + the head
    lora()         # the LoRA factors under params["lora"] + the head (see transfer.lora)
    adapters()     # the bottleneck adapters under params["adapters"] + the head
    feature_encoder_frozen()  # speech (wav2vec2): the conv feature encoder frozen, the rest trains
"""

from __future__ import annotations

from jaxfer import masks

HEAD = "classifier/**"


def _with_head(first: tuple, head: str | None, lr: float) -> tuple:
    return (first, *(((head, lr),) if head else ()), ("**", None))


def bitfit(head: str | None = HEAD, lr: float = 1.0) -> tuple:
    """Biases (:func:`jaxfer.masks.bias`) and the head train; everything else is frozen."""
    return _with_head((masks.bias(), lr), head, lr)


def norm_tuning(head: str | None = HEAD, lr: float = 1.0) -> tuple:
    """Normalisation parameters (:func:`jaxfer.masks.norm`) and the head train."""
    return _with_head((masks.norm(), lr), head, lr)


def lora(head: str | None = HEAD, lr: float = 1.0, name: str = "*") -> tuple:
    """The LoRA factors of adapter ``name`` (all: ``"*"``) and the head train."""
    return _with_head((f"lora/{name}/**", lr), head, lr)


def adapters(head: str | None = HEAD, lr: float = 1.0) -> tuple:
    """The bottleneck adapters and the head train."""
    return _with_head(("adapters/**", lr), head, lr)


FEATURE_ENCODER = "**/feature_extractor/**"


def feature_encoder_frozen(lr: float = 1.0) -> tuple:
    """The standard first rule for fine-tuning wav2vec2 (HF's ``freeze_feature_encoder()``):
    the convolutional feature encoder on the waveform stays as it is, everything above it
    (feature projection, positional conv, transformer, head) trains with multiplier ``lr``."""
    return ((FEATURE_ENCODER, None), ("**", lr))


PRESETS = {"bitfit": bitfit, "norm_tuning": norm_tuning, "lora": lora, "adapters": adapters,
           "feature_encoder_frozen": feature_encoder_frozen}

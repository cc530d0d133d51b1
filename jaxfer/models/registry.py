"""Model families by Hugging Face ``model_type``.

Each model family file (``bert.py``, ``vit.py``, ``resnet.py`` ...) registers one
:class:`Family` per ``model_type`` it serves. ``jaxfer.weights`` looks families up
here to build the module from a ``config.json`` and to convert checkpoint keys
(each family's ``KEY_MAP`` on :mod:`jaxfer.models.keymap`; shared layers in
:mod:`jaxfer.models.common`).
Model code never reads jaxfer configs; it reads the architecture's own HF config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxfer.errors import ConfigError
from jaxfer.models.keymap import FlatVariables


@dataclasses.dataclass(frozen=True)
class Family:
    """What jaxfer needs to know about one architecture.

    Attributes:
      model_type: the HF ``config.json`` ``model_type`` (``"bert"``, ``"vit"`` ...).
      build: HF config (a ``transformers.PretrainedConfig`` or a plain dict) ->
        ``flax.linen.Module`` backbone (no task head).
      convert: ``(state_dict, config) -> (FlatVariables, unused_keys)``;
        ``state_dict`` maps PyTorch/safetensors key names of the *backbone* to
        numpy arrays, with the HF ``base_model_prefix`` (``"bert."``) already
        stripped by the loader; ``unused_keys`` lists the keys no rule of the
        family's declarative key map consumed (the loader reports them as
        unexpected). Returned paths have no prefix either.
      dummy_inputs: ``config -> dict`` of example inputs for ``init``.
      layer_pattern: regex whose first group is the layer index in a param path
        (or a function ``path -> int | None``),
        used by layer-range masks, layer-wise lr decay and cached prefixes. For
        a family with several stacks (T5), the first stack's (see ``layer_stacks``).
      num_layers: ``config -> int`` (all stacks together).
      base_model_prefix: the HF prefix of the backbone in task checkpoints and
        in our task-model params (``"bert"``, ``"vit"``, ``"resnet"``).
      default_pooling: how a classification head pools the backbone output by
        default, matching HF's ``*ForSequence/ImageClassification``: ``"pooler"``
        (``pooler_output``), ``"cls"`` (``last_hidden_state[:, 0]``), ``"mean"``
        or ``"last"`` (the last real token, decoder-only models).
      head_map: key rules for the checkpoint's own classification head when its
        keys are not ``classifier.*`` beside the backbone prefix (EfficientNet's
        ``_fc``, torchvision's ``fc``): applied to the keys ``convert`` left unused,
        they land in the head's namespace (``classifier/kernel``), so a head of the
        same size loads them and another size needs ``reinit=["classifier/**"]``.
        Also applied first to a task checkpoint's keys beside the backbone prefix
        (wav2vec2's ``lm_head.*``, ``projector.*``).
      feature_layers: ``config -> tuple`` of module paths inside the backbone
        whose outputs are the family's named feature maps (stage ends, shallow to
        deep; :mod:`jaxfer.models.feature_maps`).
      preprocessing: ``config -> dict`` of the inputs the pretrained weights expect
        (``size``, ``crop_pct``, ``mean``, ``std``, ``resample``; see
        :func:`jaxfer.data.image.transform_options`), used when the checkpoint has
        no ``preprocessor_config.json``.
      layer_stacks: ``config -> ((regex, size), ...)`` for families with several
        layer stacks (T5: encoder then decoder); ``None`` for one stack.
      key_map: the family's ``KEY_MAP`` (the rules ``convert`` applies); saving
        back to the checkpoint layout inverts it (:func:`keymap.invert_key_map`).
      task_heads: HF task architecture (``"BertForSequenceClassification"``) ->
        ``head(num_labels, config)``, the head module that architecture defines:
        ``load(dir, head="checkpoint")`` builds it, ``save`` names it.
      text_limits: text families: ``config -> (vocab_size, max_positions)``, the
        token ids ``[0, vocab_size)`` and the sequence length its embedding
        tables hold (inputs past them give NaN; ``None``: no position table);
        ``None`` for other families.
    """

    model_type: str
    build: Callable[[Any], Any]
    convert: Callable[[Mapping[str, np.ndarray], Any], tuple[FlatVariables, list[str]]]
    dummy_inputs: Callable[[Any], dict]
    layer_pattern: str | Callable[[str], int | None]
    num_layers: Callable[[Any], int]
    base_model_prefix: str = ""
    default_pooling: str = "pooler"
    text_limits: Callable[[Any], tuple[int, int | None]] | None = None
    head_map: tuple = ()
    feature_layers: Callable[[Any], tuple[str, ...]] | None = None
    preprocessing: Callable[[Any], dict] | None = None
    layer_stacks: Callable[[Any], tuple[tuple[str, int], ...]] | None = None
    key_map: tuple = ()
    task_heads: Mapping[str, Callable[[int, Any], Any]] = dataclasses.field(default_factory=dict)

    def layer_pattern_for(self, config: Any) -> Any:
        """The layer pattern to use for a model of this ``config``: ``layer_pattern``, or
        a :class:`jaxfer.masks.Stacks` numbering every stack's layers one after another."""
        if self.layer_stacks is None:
            return self.layer_pattern
        from jaxfer.masks import Stacks

        return Stacks(tuple(self.layer_stacks(config)))


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def get(model_type: str) -> Family:
    _import_builtin_families()
    try:
        return _FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ConfigError(f"no jaxfer model family for model_type {model_type!r} (from the "
                          f"weights' config.json); known: {known}") from None


def known() -> list[str]:
    _import_builtin_families()
    return sorted(_FAMILIES)


def _import_builtin_families() -> None:
    # Imported lazily so that `import jaxfer` stays cheap; each module registers itself.
    import importlib

    for name in ("bert", "vit", "resnet", "efficientnet", "vgg", "inception", "gpt2", "t5", "distilbert",
                 "wav2vec2"):
        try:
            importlib.import_module(f"jaxfer.models.{name}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != f"jaxfer.models.{name}":
                raise

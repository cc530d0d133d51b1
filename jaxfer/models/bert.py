"""BERT (also MiniLM / sentence-transformers and RoBERTa checkpoints) in flax.linen.

Params use the Hugging Face Flax layout, so ``flax_model.msgpack`` files load as
they are::

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer/<i>/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer/<i>/attention/output/{dense,LayerNorm}/...
    encoder/layer/<i>/{intermediate,output}/dense/..., output/LayerNorm/...
    pooler/dense/{kernel,bias}

``KEY_MAP`` converts PyTorch/safetensors names (``encoder.layer.0.attention.self.query.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer.models import heads, registry
from jaxfer.models.common import LayerNorm, LayerStack, SelfAttention, activation, config_dict, dense, \
    padding_bias
from jaxfer.models.keymap import KeyRule, apply_key_map

# Defaults for what a plain-dict config may leave out (HF configs carry every field).
DEFAULTS = dict(layer_norm_eps=1e-12, initializer_range=0.02, hidden_act="gelu", type_vocab_size=2)


class DenseNorm(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))`` (HF's ``*SelfOutput`` and ``*Output``)."""

    c: Mapping

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        c = self.c
        x = dense(c["hidden_size"], c["initializer_range"], "dense")(x)
        x = nn.Dropout(c["hidden_dropout_prob"])(x, deterministic=deterministic)
        return LayerNorm(epsilon=c["layer_norm_eps"], name="LayerNorm")(x + residual)


class Attention(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        a = SelfAttention(c["num_attention_heads"], c["initializer_range"], c["attention_probs_dropout_prob"],
                          name="self")(x, bias, deterministic)
        return DenseNorm(self.c, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x):
        c = self.c
        return activation(c["hidden_act"])(dense(c["intermediate_size"], c["initializer_range"], "dense")(x))


class Layer(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        a = Attention(self.c, name="attention")(x, bias, deterministic)
        return DenseNorm(self.c, name="output")(Intermediate(self.c, name="intermediate")(a), a, deterministic)


class Encoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        return LayerStack(lambda i, name: Layer(c, name=name), c["num_hidden_layers"], name="layer")(
            x, bias, deterministic)


class Embeddings(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
        c = self.c
        init = nn.initializers.normal(c["initializer_range"])
        h = c["hidden_size"]
        words = nn.Embed(c["vocab_size"], h, embedding_init=init, name="word_embeddings")(input_ids)
        pos = nn.Embed(c["max_position_embeddings"], h, embedding_init=init, name="position_embeddings")(position_ids)
        types = nn.Embed(c["type_vocab_size"], h, embedding_init=init, name="token_type_embeddings")(token_type_ids)
        x = LayerNorm(epsilon=c["layer_norm_eps"], name="LayerNorm")(words + pos + types)
        return nn.Dropout(c["hidden_dropout_prob"])(x, deterministic=deterministic)


class Pooler(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(dense(self.c["hidden_size"], self.c["initializer_range"], "dense")(h[:, 0]))


class BertModel(nn.Module):
    """BERT backbone. ``config``: a HF ``BertConfig``/``RobertaConfig`` or its dict.

    ``__call__(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    *, train=False, output_hidden_states=False)`` -> dict with ``last_hidden_state``
    ``(B, T, H)``, ``pooler_output`` ``(B, H)`` (``tanh(dense(h[:, 0]))``) and, when asked,
    ``hidden_states`` (embeddings output then every layer's output).
    Dropout is active only with ``train=True`` (needs ``rngs={"dropout": key}``).
    """

    config: Any
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
                 train: bool = False, output_hidden_states: bool = False):
        c = config_dict(self.config, DEFAULTS)
        det = not train
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(input_ids, c)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, det)
        bias = padding_bias(attention_mask, x.dtype)
        states = Encoder(c, name="encoder")(x, bias, det)
        out = {"last_hidden_state": states[-1]}
        if self.add_pooling_layer:
            out["pooler_output"] = Pooler(c, name="pooler")(states[-1])
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


def default_position_ids(input_ids, c: Mapping) -> jax.Array:
    """``0..T-1`` for BERT; RoBERTa counts non-pad tokens from ``pad_token_id + 1``."""
    t = input_ids.shape[-1]
    if c.get("model_type") in ("roberta", "xlm-roberta"):
        pad = c.get("pad_token_id", 1)
        mask = (input_ids != pad).astype(jnp.int32)
        return jnp.cumsum(mask, axis=-1) * mask + pad
    return jnp.broadcast_to(jnp.arange(t), input_ids.shape)


# ------------------------------------------------------------------ key map
KEY_MAP = [
    KeyRule(r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings/\1_embeddings/embedding",
         "embedding"),
    KeyRule(r"(.*)\.LayerNorm\.(?:weight|gamma)", r"\1/LayerNorm/scale", "norm_scale"),
    KeyRule(r"(.*)\.LayerNorm\.(?:bias|beta)", r"\1/LayerNorm/bias"),
    KeyRule(r"(encoder\.layer\.\d+\..*|pooler\.dense)\.weight", r"\1/kernel", "linear", ndim=2),
    KeyRule(r"(encoder\.layer\.\d+\..*|pooler\.dense)\.bias", r"\1/bias"),
    KeyRule(r"embeddings\.(position_ids|token_type_ids)", None),  # registered buffers
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    ids = np.zeros((1, 8), np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def text_limits(config: Any) -> tuple[int, int]:
    """``(vocab_size, max_positions)``; RoBERTa's positions start after ``pad_token_id``."""
    c = config_dict(config)
    positions = int(c["max_position_embeddings"])
    if c.get("model_type") in ("roberta", "xlm-roberta"):
        positions -= int(c.get("pad_token_id", 1)) + 1
    return int(c["vocab_size"]), positions


def build(config: Any) -> BertModel:
    """``config.add_pooling_layer = False`` (not a HF field) builds BERT without a pooler,
    as HF's ``BertFor{TokenClassification,MaskedLM,...}`` checkpoints store it."""
    return BertModel(config, add_pooling_layer=bool(config_dict(config).get("add_pooling_layer", True)))


# the heads of HF's *ForSequenceClassification (dropout from the config's classifier_dropout)
TASK_HEADS = {
    "bert": {"BertForSequenceClassification": lambda n, config: heads.Classifier(n, pooling="pooler")},
    "roberta": {"RobertaForSequenceClassification": lambda n, config: heads.TanhClassifier(n, pooling="cls")},
}


for _type, _prefix in (("bert", "bert"), ("roberta", "roberta")):
    registry.register(registry.Family(
        model_type=_type,
        build=build,
        convert=convert,
        dummy_inputs=dummy_inputs,
        layer_pattern=r"encoder/layer/(\d+)/",
        num_layers=lambda config: int(config_dict(config)["num_hidden_layers"]),
        base_model_prefix=_prefix,
        default_pooling="pooler",
        key_map=tuple(KEY_MAP),
        task_heads=TASK_HEADS[_type],
        feature_layers=lambda config: ("embeddings", *(f"encoder/layer/{i}" for i in range(
            int(config_dict(config)["num_hidden_layers"])))),
        text_limits=text_limits,
    ))

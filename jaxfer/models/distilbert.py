"""DistilBERT in flax.linen: BERT's post-norm layers with other names, no token types, no pooler.

Params use the Hugging Face Flax layout::

    embeddings/{word,position}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
    transformer/layer/<i>/attention/{q_lin,k_lin,v_lin,out_lin}/{kernel,bias}
    transformer/layer/<i>/sa_layer_norm/..., ffn/{lin1,lin2}/..., output_layer_norm/...

Classifier heads pool the first token (``"cls"``). HF's
``DistilBertForSequenceClassification`` head (``pre_classifier`` + ReLU + ``classifier``)
is not ours: its keys are reported as dropped, so train a new head
(``reinit=["classifier/**"]`` when the class count matches).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.models.common import (LayerStack, activation, attend, config_dict, dense, merge_heads, padding_bias,
                                  split_heads)
from jaxfer.models.keymap import KeyRule, apply_key_map

DEFAULTS = dict(vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768, hidden_dim=3072,
                dropout=0.1, attention_dropout=0.1, activation="gelu", initializer_range=0.02)
EPS = 1e-12  # fixed in HF's DistilBERT


class Attention(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        std, n = c["initializer_range"], c["n_heads"]
        q, k, v = (split_heads(dense(c["dim"], std, name)(x), n) for name in ("q_lin", "k_lin", "v_lin"))
        dropout = functools.partial(nn.Dropout(c["attention_dropout"]), deterministic=deterministic)
        return dense(c["dim"], std, "out_lin")(merge_heads(attend(q, k, v, bias, dropout=dropout)))


class Layer(nn.Module):
    """``a = LN(x + attention(x))``, then ``LN(a + dropout(lin2(act(lin1(a)))))``."""

    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        a = nn.LayerNorm(EPS, name="sa_layer_norm")(x + Attention(c, name="attention")(x, bias, deterministic))
        ffn = FFN(c, name="ffn")(a, deterministic)
        return nn.LayerNorm(EPS, name="output_layer_norm")(a + ffn)


class FFN(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        h = activation(c["activation"])(dense(c["hidden_dim"], c["initializer_range"], "lin1")(x))
        h = dense(c["dim"], c["initializer_range"], "lin2")(h)
        return nn.Dropout(c["dropout"])(h, deterministic=deterministic)


class Transformer(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        return LayerStack(lambda i, name: Layer(self.c, name=name), self.c["n_layers"], name="layer")(
            x, bias, deterministic)


class DistilBertModel(nn.Module):
    """DistilBERT backbone. ``config``: a HF ``DistilBertConfig`` or its dict.

    ``__call__(input_ids, attention_mask=None, position_ids=None, *, train=False,
    output_hidden_states=False)`` -> ``last_hidden_state`` ``(B, T, dim)`` and, when
    asked, ``hidden_states`` (embeddings output, then every layer's).
    """

    config: Any

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, train: bool = False,
                 output_hidden_states: bool = False):
        c = config_dict(self.config, DEFAULTS)
        det = not train
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = Embeddings(c, name="embeddings")(input_ids, position_ids, det)
        states = Transformer(c, name="transformer")(x, padding_bias(attention_mask, x.dtype), det)
        out = {"last_hidden_state": states[-1]}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


class Embeddings(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, input_ids, position_ids, deterministic: bool):
        c = self.c
        init = nn.initializers.normal(c["initializer_range"])
        x = nn.Embed(c["vocab_size"], c["dim"], embedding_init=init, name="word_embeddings")(input_ids)
        x = x + nn.Embed(c["max_position_embeddings"], c["dim"], embedding_init=init,
                         name="position_embeddings")(position_ids)
        x = nn.LayerNorm(EPS, name="LayerNorm")(x)
        return nn.Dropout(c["dropout"])(x, deterministic=deterministic)


# ------------------------------------------------------------------ key map
KEY_MAP = [
    KeyRule(r"embeddings\.(word|position)_embeddings\.weight", r"embeddings/\1_embeddings/embedding", "embedding"),
    KeyRule(r"(.*(?:LayerNorm|layer_norm))\.weight", r"\1/scale", "norm_scale"),
    KeyRule(r"(.*(?:LayerNorm|layer_norm))\.bias", r"\1/bias"),
    KeyRule(r"(transformer\.layer\.\d+\.(?:attention\.\w+_lin|ffn\.lin[12]))\.weight", r"\1/kernel", "linear", ndim=2),
    KeyRule(r"(transformer\.layer\.\d+\.(?:attention\.\w+_lin|ffn\.lin[12]))\.bias", r"\1/bias"),
    KeyRule(r"embeddings\.position_ids", None),  # a buffer
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    ids = np.zeros((1, 8), np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


registry.register(registry.Family(
    model_type="distilbert",
    build=DistilBertModel,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"(?:^|/)transformer/layer/(\d+)/",
    num_layers=lambda config: int(config_dict(config, DEFAULTS)["n_layers"]),
    base_model_prefix="distilbert",
    key_map=tuple(KEY_MAP),
    default_pooling="cls",
    text_limits=lambda config: (int(config_dict(config, DEFAULTS)["vocab_size"]),
                                int(config_dict(config, DEFAULTS)["max_position_embeddings"])),
))

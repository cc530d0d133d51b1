"""T5 (encoder-decoder, relative position buckets) in flax.linen, with its LM head.

Params use the Hugging Face Flax layout::

    shared/embedding                                          tied token embedding
    encoder/block/<i>/layer/0/SelfAttention/{q,k,v,o}/kernel  (no biases)
    encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding
    encoder/block/<i>/layer/0/layer_norm/weight               RMS norms (scale only)
    encoder/block/<i>/layer/1/DenseReluDense/{wi,wo}/kernel   (wi_0, wi_1 when gated)
    encoder/final_layer_norm/weight
    decoder/block/<j>/layer/{0: SelfAttention, 1: EncDecAttention, 2: DenseReluDense}/...
    decoder/final_layer_norm/weight
    lm_head/kernel                                            only when not tied

Attention is unscaled (T5 folds ``1/sqrt(d)`` into the init); block 0 of each stack
owns the relative-position bias, which every block of the stack adds to its scores
(:func:`relative_position_bucket`: exact buckets for short distances, logarithmic
ones up to ``relative_attention_max_distance``; one-directional in the decoder).

The LM head is tied to ``shared`` with the decoder output scaled by ``d_model ** -0.5``
(original T5; ``scale_decoder_outputs``), or a separate ``lm_head`` without scaling
(T5 v1.1 / Flan-T5: ``tie_word_embeddings=False``); a checkpoint that stores no
``lm_head.weight`` for the latter gets ``shared``'s, as transformers ties it.

Calls: ``module(input_ids, attention_mask, decoder_input_ids=..., labels=...)``
runs both stacks (``labels`` alone: ``decoder_input_ids`` is ``labels`` shifted right
after the decoder start token, ``-100`` read as pad, as HF's ``_shift_right``);
without decoder inputs it runs the encoder alone, a feature extractor for
probes and classifier heads (``encoder_only=True`` in the config builds no decoder
at all). ``module.encode`` / ``module.decode(..., cache=)`` / ``module.init_cache``
serve :mod:`jaxfer.generation`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.models.common import (RMSNorm, activation, attend, cache_write, causal_bias, config_dict, empty_cache,
                                  merge_heads, padding_bias, split_heads)
from jaxfer.models.fused import dense_dot_general
from jaxfer.models.keymap import KeyRule, apply_key_map

DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
                num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                dropout_rate=0.1, layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu",
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                encoder_only=False)


def _config(config: Any) -> dict:
    c = config_dict(config, DEFAULTS)
    if c["num_decoder_layers"] is None:
        c["num_decoder_layers"] = c["num_layers"]
    parts = c["feed_forward_proj"].split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {c['feed_forward_proj']!r}: expected 'ACT' or 'gated-ACT'")
    c["gated"] = parts[0] == "gated" and len(parts) == 2
    c["act"] = "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else parts[-1]
    # transformers 5 keeps the original tie_word_embeddings as scale_decoder_outputs
    scale = c.get("scale_decoder_outputs")
    c["tied_head"] = bool(c["tie_word_embeddings"] if scale is None else scale)
    return c


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket of ``memory_position - query_position``.

    Bidirectional: half the buckets for keys after the query. Within a direction,
    distances below ``n/2`` (``n`` buckets there) get a bucket each, larger ones
    ``n/2 + log(d / (n/2)) / log(max_distance / (n/2)) * (n - n/2)`` (truncated),
    capped at ``n - 1``. One-directional (the decoder): keys after the query all
    fall in bucket 0 (they are masked anyway).
    """
    rel = jnp.asarray(relative_position)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(rel.dtype) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
                         / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


def _normal(std: float):
    return nn.initializers.normal(std)


def _dense(features: int, std: float, name: str | None = None) -> nn.Dense:
    """T5's bias-free ``nn.Dense`` (HF init ``normal(std)``) on :func:`~jaxfer.models.fused.dense_dot_general`."""
    return nn.Dense(features, use_bias=False, kernel_init=_normal(std), dot_general=dense_dot_general, name=name)


class Attention(nn.Module):
    """HF's ``T5Attention``: ``q, k, v, o`` without bias, no ``1/sqrt(d)``; ``compute_bias``
    when this is block 0's self-attention."""

    c: Mapping
    causal: bool = False
    has_relative_bias: bool = False

    def setup(self):
        c = self.c
        d, n, dkv, f = c["d_model"], c["num_heads"], c["d_kv"], c["initializer_factor"]
        inner = n * dkv
        self.q = _dense(inner, f * (d * dkv) ** -0.5)
        self.k = _dense(inner, f * d ** -0.5)
        self.v = _dense(inner, f * d ** -0.5)
        self.o = _dense(d, f * inner ** -0.5)
        if self.has_relative_bias:
            self.relative_attention_bias = nn.Embed(c["relative_attention_num_buckets"], n,
                                                    embedding_init=_normal(f * d ** -0.5))
        self.dropout = nn.Dropout(c["dropout_rate"])

    def compute_bias(self, query_slots: jax.Array, key_length: int) -> jax.Array:
        """Relative-position bias ``(1, heads, T, S)`` for queries at ``query_slots`` and keys ``0..S-1``."""
        rel = jnp.arange(key_length)[None, :] - jnp.asarray(query_slots)[:, None]
        buckets = relative_position_bucket(rel, not self.causal, self.c["relative_attention_num_buckets"],
                                           self.c["relative_attention_max_distance"])
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x, bias, deterministic: bool, context=None, cache=None, index=None):
        n = self.c["num_heads"]
        q = split_heads(self.q(x), n)
        if context is None:  # self-attention, maybe writing into the cache
            k, v = split_heads(self.k(x), n), split_heads(self.v(x), n)
            if cache is not None:
                cache = cache_write(cache, k, v, index)
                k, v = cache["key"], cache["value"]
        elif cache is not None:  # cross-attention: the encoder's keys/values, computed once
            k, v = cache["key"], cache["value"]
        else:
            k, v = split_heads(self.k(context), n), split_heads(self.v(context), n)
            cache = {"key": k, "value": v}
        dropout = functools.partial(self.dropout, deterministic=deterministic)
        return self.o(merge_heads(attend(q, k, v, bias, scale=1.0, dropout=dropout))), cache


class LayerSelfAttention(nn.Module):
    c: Mapping
    causal: bool
    has_relative_bias: bool

    def setup(self):
        self.SelfAttention = Attention(self.c, self.causal, self.has_relative_bias)
        self.layer_norm = RMSNorm(self.c["layer_norm_epsilon"])
        self.dropout = nn.Dropout(self.c["dropout_rate"])

    def __call__(self, x, bias, deterministic: bool, cache=None, index=None):
        y, cache = self.SelfAttention(self.layer_norm(x), bias, deterministic, cache=cache, index=index)
        return x + self.dropout(y, deterministic=deterministic), cache


class LayerCrossAttention(nn.Module):
    c: Mapping

    def setup(self):
        self.EncDecAttention = Attention(self.c)
        self.layer_norm = RMSNorm(self.c["layer_norm_epsilon"])
        self.dropout = nn.Dropout(self.c["dropout_rate"])

    def __call__(self, x, context, bias, deterministic: bool, cache=None):
        y, cache = self.EncDecAttention(self.layer_norm(x), bias, deterministic, context=context, cache=cache)
        return x + self.dropout(y, deterministic=deterministic), cache


class DenseReluDense(nn.Module):
    """``wo(dropout(act(wi(x))))``, or ``wo(dropout(act(wi_0(x)) * wi_1(x)))`` when gated."""

    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        d, ff, f = c["d_model"], c["d_ff"], c["initializer_factor"]
        wi = lambda name: _dense(ff, f * d ** -0.5, name=name)
        act = activation(c["act"])
        h = act(wi("wi_0")(x)) * wi("wi_1")(x) if c["gated"] else act(wi("wi")(x))
        h = nn.Dropout(c["dropout_rate"])(h, deterministic=deterministic)
        return _dense(d, f * ff ** -0.5, name="wo")(h)


class LayerFF(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        y = DenseReluDense(self.c, name="DenseReluDense")(RMSNorm(self.c["layer_norm_epsilon"], name="layer_norm")(x),
                                                          deterministic)
        return x + nn.Dropout(self.c["dropout_rate"])(y, deterministic=deterministic)


class Sublayers(nn.Module):
    """``layer/0`` self-attention, (decoder) ``layer/1`` cross-attention, then the feed-forward."""

    c: Mapping
    causal: bool
    has_relative_bias: bool

    def setup(self):
        layers = [LayerSelfAttention(self.c, self.causal, self.has_relative_bias, name="0")]
        if self.causal:
            layers.append(LayerCrossAttention(self.c, name="1"))
        layers.append(LayerFF(self.c, name=str(len(layers))))
        self.layers = layers

    def __call__(self, x, bias, deterministic: bool, context=None, context_bias=None, cache=None, index=None):
        x, self_cache = self.layers[0](x, bias, deterministic, None if cache is None else cache["self"], index)
        cross_cache = None
        if self.causal and context is not None:
            x, cross_cache = self.layers[1](x, context, context_bias, deterministic,
                                            None if cache is None else cache["cross"])
        return self.layers[-1](x, deterministic), {"self": self_cache, "cross": cross_cache}


class Block(nn.Module):
    """``block/<i>``: one layer of a stack (its output alone, or ``(output, cache)``)."""

    c: Mapping
    causal: bool
    has_relative_bias: bool

    def setup(self):
        self.layer = Sublayers(self.c, self.causal, self.has_relative_bias)

    def __call__(self, x, bias, deterministic: bool, context=None, context_bias=None, cache=None, index=None):
        y, new_cache = self.layer(x, bias, deterministic, context, context_bias, cache, index)
        return y if cache is None else (y, new_cache)


class Blocks(nn.Module):
    c: Mapping
    causal: bool
    num_layers: int

    def setup(self):
        self.blocks = [Block(self.c, self.causal, i == 0, name=str(i)) for i in range(self.num_layers)]

    def position_bias(self, query_slots, key_length):
        return self.blocks[0].layer.layers[0].SelfAttention.compute_bias(query_slots, key_length)

    def __call__(self, x, bias, deterministic: bool, context=None, context_bias=None, caches=None, index=None):
        states, new_caches = [x], []
        for i, block in enumerate(self.blocks):
            if caches is None:
                states.append(block(states[-1], bias, deterministic, context, context_bias))
            else:
                y, cache = block(states[-1], bias, deterministic, context, context_bias, caches[i], index)
                states.append(y)
                new_caches.append(cache)
        return states, (None if caches is None else tuple(new_caches))


class Stack(nn.Module):
    """An encoder (``causal=False``) or decoder stack on embedded inputs."""

    c: Mapping
    causal: bool
    num_layers: int

    def setup(self):
        self.block = Blocks(self.c, self.causal, self.num_layers)
        self.final_layer_norm = RMSNorm(self.c["layer_norm_epsilon"])
        self.dropout = nn.Dropout(self.c["dropout_rate"])

    def __call__(self, x, mask, deterministic: bool, context=None, context_mask=None, caches=None, index=None):
        t = x.shape[1]
        index = jnp.asarray(0, jnp.int32) if index is None else index
        slots = index + jnp.arange(t)
        s = mask.shape[1]
        if self.causal:
            bias = causal_bias(mask, slots, x.dtype)
        else:
            bias = padding_bias(mask, x.dtype)
        bias = bias + self.block.position_bias(slots, s).astype(x.dtype)
        context_bias = None if context is None else padding_bias(context_mask, x.dtype)
        x = self.dropout(x, deterministic=deterministic)
        states, caches = self.block(x, bias, deterministic, context, context_bias, caches, index)
        h = self.dropout(self.final_layer_norm(states[-1]), deterministic=deterministic)
        return h, (*states[:-1], h), caches


def shift_right(labels: jax.Array, start_token_id: int, pad_token_id: int) -> jax.Array:
    """Decoder inputs from targets: ``[start, y_0, ..., y_{T-2}]``, ``-100`` read as pad."""
    labels = jnp.asarray(labels)
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class T5Model(nn.Module):
    """T5 with its LM head. ``config``: a HF ``T5Config`` or its dict.

    ``__call__(input_ids, attention_mask=None, decoder_input_ids=None,
    decoder_attention_mask=None, labels=None, *, train=False, output_hidden_states=False)``:
    with decoder inputs (or ``labels``) -> ``logits (B, T_dec, vocab)``,
    ``last_hidden_state`` (the decoder's), ``encoder_last_hidden_state``; without ->
    the encoder alone: ``last_hidden_state`` (``B, T, d_model``). ``hidden_states`` /
    ``encoder_hidden_states`` when asked (embeddings, then each block, the last
    after the final norm).
    """

    config: Any

    def setup(self):
        c = _config(self.config)
        self.c = c
        self.shared = nn.Embed(c["vocab_size"], c["d_model"], embedding_init=_normal(c["initializer_factor"]))
        self.encoder = Stack(c, False, c["num_layers"])
        if not c["encoder_only"]:
            self.decoder = Stack(c, True, c["num_decoder_layers"])
            if not c["tied_head"]:
                self.lm_head = _dense(c["vocab_size"], c["initializer_factor"])

    def encode(self, input_ids, attention_mask=None, *, train: bool = False, output_hidden_states: bool = False):
        input_ids = jnp.asarray(input_ids)
        mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        h, states, _ = self.encoder(self.shared(input_ids), mask, not train)
        out = {"last_hidden_state": h}
        if output_hidden_states:
            out["hidden_states"] = states
        return out

    def decode(self, decoder_input_ids, encoder_hidden_states, attention_mask=None, decoder_attention_mask=None, *,
               cache=None, train: bool = False, output_hidden_states: bool = False):
        """Decoder + LM head over the encoder output. With ``cache`` (:meth:`init_cache`) the
        tokens go to slots ``cache["index"] ..`` and ``decoder_attention_mask`` (default ones)
        covers every slot; the output then has the updated ``cache``."""
        if self.c["encoder_only"]:
            raise ValueError("this T5 was built with encoder_only=True: it has no decoder")
        ids = jnp.asarray(decoder_input_ids)
        enc = encoder_hidden_states
        enc_mask = jnp.ones(enc.shape[:2], jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        length = ids.shape[1] if cache is None else cache["layers"][0]["self"]["key"].shape[1]
        dec_mask = (jnp.ones((ids.shape[0], length), jnp.int32) if decoder_attention_mask is None
                    else jnp.asarray(decoder_attention_mask))
        index = None if cache is None else cache["index"]
        h, states, layers = self.decoder(self.shared(ids), dec_mask, not train, enc, enc_mask,
                                         None if cache is None else cache["layers"], index)
        if self.c["tied_head"]:
            logits = self.shared.attend(h * self.c["d_model"] ** -0.5)
        else:
            logits = self.lm_head(h)
        out = {"logits": logits, "last_hidden_state": h}
        if cache is not None:
            out["cache"] = {"index": cache["index"] + ids.shape[1], "layers": layers}
        if output_hidden_states:
            out["hidden_states"] = states
        return out

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, *, train: bool = False, output_hidden_states: bool = False):
        enc = self.encode(input_ids, attention_mask, train=train, output_hidden_states=output_hidden_states)
        if decoder_input_ids is None and labels is not None:
            decoder_input_ids = shift_right(labels, self.c["decoder_start_token_id"], self.c["pad_token_id"])
        if decoder_input_ids is None:
            return enc
        out = self.decode(decoder_input_ids, enc["last_hidden_state"], attention_mask, decoder_attention_mask,
                          train=train, output_hidden_states=output_hidden_states)
        out["encoder_last_hidden_state"] = enc["last_hidden_state"]
        if output_hidden_states:
            out["encoder_hidden_states"] = enc["hidden_states"]
        return out

    def init_cache(self, batch_size: int, length: int, dtype: Any = jnp.float32) -> dict:
        """An empty decoder cache of ``length`` slots; each layer's cross-attention keys and
        values are filled by the first :meth:`decode` call."""
        c = _config(self.config)
        return {"index": jnp.asarray(0, jnp.int32),
                "layers": tuple({"self": empty_cache(batch_size, length, c["num_heads"], c["d_kv"], dtype),
                                 "cross": None} for _ in range(c["num_decoder_layers"]))}


# ------------------------------------------------------------------ key map
KEY_MAP = [
    KeyRule(r"shared\.weight", "shared/embedding", "embedding"),
    KeyRule(r"(?:encoder|decoder)\.embed_tokens\.weight", None),  # copies of shared.weight
    KeyRule(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight", None),  # unused
    KeyRule(r"(.*)\.relative_attention_bias\.weight", r"\1/relative_attention_bias/embedding", "embedding"),
    KeyRule(r"(.*(?:layer_norm|final_layer_norm))\.weight", r"\1/weight", ndim=1),
    KeyRule(r"(.*)\.weight", r"\1/kernel", "linear", ndim=2),
]
ENCODER_ONLY_DROPS = [KeyRule(r"(?:decoder\..*|lm_head\.weight)", None)]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    c = _config(config)
    rules = (ENCODER_ONLY_DROPS if c["encoder_only"] else []) + KEY_MAP
    flat, unused = apply_key_map(rules, state_dict)
    params = flat["params"]
    if not c["encoder_only"] and not c["tied_head"] and "lm_head/kernel" not in params and "shared/embedding" in params:
        params["lm_head/kernel"] = np.ascontiguousarray(params["shared/embedding"].T)  # tied, as transformers does
    return flat, unused


def dummy_inputs(config: Any) -> dict:
    ids = np.zeros((1, 8), np.int32)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if not _config(config)["encoder_only"]:
        out["decoder_input_ids"] = np.zeros((1, 4), np.int32)
    return out


def build(config: Any) -> T5Model:
    _config(config)
    return T5Model(config)


ENCODER_LAYERS = r"(?:^|/)encoder/block/(\d+)/"
DECODER_LAYERS = r"(?:^|/)decoder/block/(\d+)/"


def layer_stacks(config: Any) -> tuple[tuple[str, int], ...]:
    """Encoder blocks ``0..E-1``, then decoder blocks ``E..E+D-1``."""
    c = _config(config)
    if c["encoder_only"]:
        return ((ENCODER_LAYERS, c["num_layers"]),)
    return (ENCODER_LAYERS, c["num_layers"]), (DECODER_LAYERS, c["num_decoder_layers"])


registry.register(registry.Family(
    model_type="t5",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=ENCODER_LAYERS,
    num_layers=lambda config: sum(n for _, n in layer_stacks(config)),
    base_model_prefix="transformer",
    key_map=tuple(KEY_MAP),
    default_pooling="mean",
    layer_stacks=layer_stacks,
    text_limits=lambda config: (int(config_dict(config, DEFAULTS)["vocab_size"]), None),  # relative positions
))

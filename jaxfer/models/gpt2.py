"""GPT-2 (decoder-only transformer) in flax.linen, with its tied language-model head.

Params (paths as in HF's ``GPT2Model``; under ``transformer/`` when a head is attached)::

    wte/embedding  wpe/embedding                      token and position embeddings
    h/<i>/ln_1/{scale,bias}  h/<i>/ln_2/{scale,bias}  pre-norms of block i
    h/<i>/attn/c_attn/{kernel,bias}                   fused q|k|v projection, kernel (H, 3H)
    h/<i>/attn/c_proj/..., h/<i>/mlp/{c_fc,c_proj}/...
    ln_f/{scale,bias}

Kernels are ``(in, out)``, the layout of torch GPT-2's ``Conv1D`` weights, so the
key map copies them untransposed (HF's Flax GPT-2 stored them ``(out, in)``: load
GPT-2 from safetensors or ``.bin``, which every hub GPT-2 has). The ``attn.bias``
/ ``attn.masked_bias`` buffers of old checkpoints are causal masks, not weights:
they are consumed and dropped.

The language-model head is tied: ``logits = ln_f(h) @ wte^T`` has no parameters of
its own, so the module always returns ``logits`` next to ``last_hidden_state``
(under ``jit`` XLA drops them when nothing reads them, e.g. under a classifier head).

Generation runs with a key/value cache of fixed size (:meth:`GPT2Model.init_cache`,
:mod:`jaxfer.generation`): ``cache={"index": i, "layers": (per-layer {"key", "value"}, ...)}``
writes the new tokens' keys/values at slots ``i ..`` and attends over every slot
up to each token's own (``attention_mask`` then covers all ``S`` slots).
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
from jaxfer.models.common import (LayerStack, activation, attend, cache_write, causal_bias, config_dict, dense,
                                  empty_cache, merge_heads, split_heads)
from jaxfer.models.keymap import KeyRule, apply_key_map

DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
                tie_word_embeddings=True)


def _config(config: Any) -> dict:
    c = config_dict(config, DEFAULTS)
    if c["add_cross_attention"]:
        raise ValueError("GPT-2 with add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
    if not c["tie_word_embeddings"]:
        raise ValueError("GPT-2 with an untied lm_head (tie_word_embeddings=False) is not supported")
    return c


class Attention(nn.Module):
    """Causal self-attention with the fused ``c_attn`` projection; returns ``(out, cache)``."""

    c: Mapping
    layer: int

    @nn.compact
    def __call__(self, x, bias, deterministic: bool, cache=None, index=None):
        c = self.c
        h, n = c["n_embd"], c["n_head"]
        std = c["initializer_range"]
        q, k, v = jnp.split(dense(3 * h, std, "c_attn")(x), 3, axis=-1)
        q, k, v = (split_heads(y, n) for y in (q, k, v))
        if cache is not None:
            cache = cache_write(cache, k, v, index)
            k, v = cache["key"], cache["value"]
        scale = (h // n) ** -0.5 if c["scale_attn_weights"] else 1.0
        if c["scale_attn_by_inverse_layer_idx"]:
            scale /= float(self.layer + 1)
        a = attend(q, k, v, bias, scale=scale,
                   dropout=functools.partial(nn.Dropout(c["attn_pdrop"]), deterministic=deterministic))
        out = dense(h, std / np.sqrt(2 * c["n_layer"]), "c_proj")(merge_heads(a))
        return nn.Dropout(c["resid_pdrop"])(out, deterministic=deterministic), cache


class MLP(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        inner = c["n_inner"] or 4 * c["n_embd"]
        y = activation(c["activation_function"])(dense(inner, c["initializer_range"], "c_fc")(x))
        y = dense(c["n_embd"], c["initializer_range"] / np.sqrt(2 * c["n_layer"]), "c_proj")(y)
        return nn.Dropout(c["resid_pdrop"])(y, deterministic=deterministic)


class Block(nn.Module):
    """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(.))`` (pre-norm)."""

    c: Mapping
    layer: int

    @nn.compact
    def __call__(self, x, bias, deterministic: bool, index=None, cache=None):
        eps = self.c["layer_norm_epsilon"]
        a, cache = Attention(self.c, self.layer, name="attn")(nn.LayerNorm(eps, name="ln_1")(x), bias,
                                                               deterministic, cache, index)
        x = x + a
        x = x + MLP(self.c, name="mlp")(nn.LayerNorm(eps, name="ln_2")(x), deterministic)
        return x if cache is None else (x, cache)


class GPT2Model(nn.Module):
    """GPT-2 with its tied LM head. ``config``: a HF ``GPT2Config`` or its dict.

    ``__call__(input_ids, attention_mask=None, position_ids=None, *, cache=None,
    train=False, output_hidden_states=False)`` -> dict with ``last_hidden_state``
    ``(B, T, H)`` (after ``ln_f``), ``logits`` ``(B, T, vocab)`` and, when asked,
    ``hidden_states`` (the embeddings' output, then every block's output, the last
    one after ``ln_f`` as in HF).

    Without a cache, token ``t`` attends to tokens ``0..t`` whose ``attention_mask``
    is 1 (``(B, T)``), and ``position_ids`` default to ``0..T-1`` as in HF. With a
    cache (:meth:`init_cache`) the ``T`` tokens go to slots ``cache["index"] ..``,
    ``attention_mask`` is ``(B, S)`` over all cache slots, and the output has the
    updated ``cache``; ``position_ids`` then default to the slots.
    """

    config: Any

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache=None, train: bool = False,
                 output_hidden_states: bool = False):
        c = _config(self.config)
        det = not train
        input_ids = jnp.asarray(input_ids)
        t = input_ids.shape[-1]
        index = jnp.asarray(0, jnp.int32) if cache is None else cache["index"]
        slots = index + jnp.arange(t)
        if attention_mask is None:
            if cache is not None:
                raise ValueError("with a cache, attention_mask (B, cache length) is required")
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(slots, input_ids.shape)
        init = nn.initializers.normal(c["initializer_range"])
        wte = nn.Embed(c["vocab_size"], c["n_embd"], embedding_init=init, name="wte")
        x = wte(input_ids) + nn.Embed(c["n_positions"], c["n_embd"], embedding_init=init, name="wpe")(position_ids)
        x = nn.Dropout(c["embd_pdrop"])(x, deterministic=det)
        bias = causal_bias(attention_mask, slots, x.dtype)
        stack = LayerStack(lambda i, name: Block(c, i, name=name), c["n_layer"], name="h")
        if cache is None:
            states = stack(x, bias, det)
        else:
            states, layers = stack(x, bias, det, index, caches=cache["layers"])
        h = nn.LayerNorm(c["layer_norm_epsilon"], name="ln_f")(states[-1])
        out = {"last_hidden_state": h, "logits": wte.attend(h)}
        if cache is not None:
            out["cache"] = {"index": index + t, "layers": layers}
        if output_hidden_states:
            out["hidden_states"] = (*states[:-1], h)
        return out

    def init_cache(self, batch_size: int, length: int, dtype: Any = jnp.float32) -> dict:
        """An empty cache of ``length`` slots (prompt + new tokens) for ``batch_size`` rows."""
        c = _config(self.config)
        n = c["n_head"]
        return {"index": jnp.asarray(0, jnp.int32),
                "layers": tuple(empty_cache(batch_size, length, n, c["n_embd"] // n, dtype)
                                for _ in range(c["n_layer"]))}


# ------------------------------------------------------------------ key map
KEY_MAP = [
    KeyRule(r"(wte|wpe)\.weight", r"\1/embedding", "embedding"),
    KeyRule(r"(h\.\d+\.ln_[12]|ln_f)\.weight", r"\1/scale", "norm_scale"),
    KeyRule(r"(h\.\d+\.ln_[12]|ln_f)\.bias", r"\1/bias"),
    # Conv1D weights are already (in, out): no transpose
    KeyRule(r"(h\.\d+\.(?:attn|mlp)\.c_\w+)\.weight", r"\1/kernel", ndim=2),
    KeyRule(r"(h\.\d+\.(?:attn|mlp)\.c_\w+)\.bias", r"\1/bias"),
    KeyRule(r"h\.\d+\.attn\.(?:bias|masked_bias)", None),  # causal-mask buffers
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    ids = np.zeros((1, 8), np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def build(config: Any) -> GPT2Model:
    _config(config)  # unsupported variants fail here, before any weights are read
    return GPT2Model(config)


LAYER_PATTERN = r"(?:^|/)h/(\d+)/"

registry.register(registry.Family(
    model_type="gpt2",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=LAYER_PATTERN,
    num_layers=lambda config: int(config_dict(config, DEFAULTS)["n_layer"]),
    base_model_prefix="transformer",
    key_map=tuple(KEY_MAP),
    default_pooling="last",
    text_limits=lambda config: (int(config_dict(config, DEFAULTS)["vocab_size"]),
                                int(config_dict(config, DEFAULTS)["n_positions"])),
))

"""Vision Transformer (ViT, also DeiT-style checkpoints without distillation token) in flax.linen.

Params use the Hugging Face Flax layout, so ``flax_model.msgpack`` files load as
they are::

    embeddings/cls_token                         (1, 1, D)
    embeddings/position_embeddings               (1, 1 + N, D)
    embeddings/patch_embeddings/projection/{kernel,bias}   kernel (P, P, C, D)
    encoder/layer/<i>/attention/attention/{query,key,value}/{kernel,bias}
    encoder/layer/<i>/attention/output/dense/{kernel,bias}
    encoder/layer/<i>/{intermediate,output}/dense/{kernel,bias}
    encoder/layer/<i>/layernorm_{before,after}/{scale,bias}
    layernorm/{scale,bias}
    pooler/dense/{kernel,bias}                   (only with a pooler)

``KEY_MAP`` converts PyTorch/safetensors names in both spellings transformers
uses: the saved-checkpoint one (``encoder.layer.0.attention.attention.query.weight``,
what ``save_pretrained`` writes and the Hub holds) and the in-memory module names of
transformers >= 5 (``layers.0.attention.q_proj.weight``, ``layers.0.mlp.fc1.weight``).

The position-embedding table is sized by the input, not the config: after
resizing ``embeddings/position_embeddings`` (a surgery op) the model takes images
of the new size; a size that disagrees with the table is a shape error at apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import heads, registry
from jaxfer.models.common import LayerNorm, LayerStack, SelfAttention, activation, config_dict, dense, pair, \
    to_nhwc
from jaxfer.models.keymap import KeyRule, apply_key_map

# transformers.ViTConfig defaults (ViT-B/16), for plain-dict configs; pooler_output_size None: hidden_size.
DEFAULTS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    initializer_range=0.02, layer_norm_eps=1e-12, image_size=224, patch_size=16,
    num_channels=3, qkv_bias=True, pooler_output_size=None, pooler_act="tanh",
)


# ------------------------------------------------------------------- modules
class PatchEmbeddings(nn.Module):
    """``(B, H, W, C)`` -> ``(B, N, D)`` with a stride-``P`` ``P x P`` conv, row-major patches."""

    c: Mapping

    @nn.compact
    def __call__(self, x):
        c = self.c
        p = pair(c["patch_size"])
        x = nn.Conv(c["hidden_size"], p, strides=p, padding="VALID",
                    kernel_init=nn.initializers.normal(c["initializer_range"]), name="projection")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class Embeddings(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        patches = PatchEmbeddings(c, name="patch_embeddings")(x)
        b, n, d = patches.shape
        init = nn.initializers.normal(c["initializer_range"])
        cls = self.param("cls_token", init, (1, 1, d), jnp.float32)
        pos = self.param("position_embeddings", init, (1, 1 + n, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(patches.dtype), patches], axis=1)
        x = x + pos.astype(x.dtype)
        return nn.Dropout(c["hidden_dropout_prob"])(x, deterministic=deterministic)


class DenseDropout(nn.Module):
    """``dropout(dense(x))`` (HF's ``ViTSelfOutput``/``ViTOutput`` without the residual)."""

    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        x = dense(self.c["hidden_size"], self.c["initializer_range"], "dense")(x)
        return nn.Dropout(self.c["hidden_dropout_prob"])(x, deterministic=deterministic)


class Attention(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        a = SelfAttention(c["num_attention_heads"], c["initializer_range"], c["attention_probs_dropout_prob"],
                          c["qkv_bias"], name="attention")(x, None, deterministic)
        return DenseDropout(self.c, name="output")(a, deterministic)


class Intermediate(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x):
        c = self.c
        return activation(c["hidden_act"])(dense(c["intermediate_size"], c["initializer_range"], "dense")(x))


class Layer(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        ln = lambda name: LayerNorm(epsilon=c["layer_norm_eps"], name=name)
        x = x + Attention(c, name="attention")(ln("layernorm_before")(x), deterministic)
        h = Intermediate(c, name="intermediate")(ln("layernorm_after")(x))
        return x + DenseDropout(c, name="output")(h, deterministic)


class Encoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        return LayerStack(lambda i, name: Layer(c, name=name), c["num_hidden_layers"], name="layer")(x, deterministic)


class Pooler(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, h):
        c = self.c
        features = c["pooler_output_size"] or c["hidden_size"]
        return activation(c["pooler_act"])(dense(features, c["initializer_range"], "dense")(h[:, 0]))


class ViTModel(nn.Module):
    """ViT backbone. ``config``: a HF ``ViTConfig`` or its dict.

    ``__call__(pixel_values, *, train=False, output_hidden_states=False)`` with
    ``pixel_values`` ``(B, C, H, W)`` as HF image processors produce them -> dict
    with ``last_hidden_state`` ``(B, 1 + N, D)`` (after the final LayerNorm),
    ``pooler_output`` ``(B, D)`` (``act(dense(h[:, 0]))``, only with a pooler) and,
    when asked, ``hidden_states`` (embeddings output then every layer's output,
    before the final LayerNorm, as HF). Dropout is active only with ``train=True``
    (needs ``rngs={"dropout": key}``).
    """

    config: Any
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False, output_hidden_states: bool = False):
        c = config_dict(self.config, DEFAULTS)
        det = not train
        x = Embeddings(c, name="embeddings")(to_nhwc(pixel_values), det)
        states = Encoder(c, name="encoder")(x, det)
        last = LayerNorm(epsilon=c["layer_norm_eps"], name="layernorm")(states[-1])
        out = {"last_hidden_state": last}
        if self.add_pooling_layer:
            out["pooler_output"] = Pooler(c, name="pooler")(last)
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out


# ------------------------------------------------------------------ key map
# (torch module regex, our module path) for every Linear; both transformers spellings.
_LINEARS = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)", r"encoder/layer/\1/attention/attention/\2"),
    (r"encoder\.layer\.(\d+)\.(attention\.output|intermediate|output)\.dense", r"encoder/layer/\1/\2/dense"),
    (r"layers\.(\d+)\.attention\.q_proj", r"encoder/layer/\1/attention/attention/query"),
    (r"layers\.(\d+)\.attention\.k_proj", r"encoder/layer/\1/attention/attention/key"),
    (r"layers\.(\d+)\.attention\.v_proj", r"encoder/layer/\1/attention/attention/value"),
    (r"layers\.(\d+)\.attention\.o_proj", r"encoder/layer/\1/attention/output/dense"),
    (r"layers\.(\d+)\.mlp\.fc1", r"encoder/layer/\1/intermediate/dense"),
    (r"layers\.(\d+)\.mlp\.fc2", r"encoder/layer/\1/output/dense"),
    (r"pooler\.dense", "pooler/dense"),
]
_NORMS = [
    (r"(?:encoder\.layer|layers)\.(\d+)\.(layernorm_before|layernorm_after)", r"encoder/layer/\1/\2"),
    (r"layernorm", "layernorm"),
]
KEY_MAP = [
    KeyRule(r"embeddings\.(cls_token|position_embeddings)", r"embeddings/\1"),
    KeyRule(r"embeddings\.patch_embeddings\.projection\.weight", "embeddings/patch_embeddings/projection/kernel",
         "conv", ndim=4),
    KeyRule(r"embeddings\.patch_embeddings\.projection\.bias", "embeddings/patch_embeddings/projection/bias"),
    *[KeyRule(src + r"\.weight", dst + "/kernel", "linear", ndim=2) for src, dst in _LINEARS],
    *[KeyRule(src + r"\.bias", dst + "/bias") for src, dst in _LINEARS],
    *[KeyRule(src + r"\.weight", dst + "/scale", "norm_scale", ndim=1) for src, dst in _NORMS],
    *[KeyRule(src + r"\.bias", dst + "/bias") for src, dst in _NORMS],
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """Backbone ``state_dict`` (``vit.`` stripped) -> ``({"params": {path: array}}, unused keys)``."""
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    c = config_dict(config, DEFAULTS)
    h, w = pair(c["image_size"])
    return {"pixel_values": np.zeros((1, c["num_channels"], h, w), np.float32)}


def has_pooler(config: Any) -> bool:
    """``config.add_pooling_layer`` if set (not a HF field); else whether the checkpoint
    is a bare ``ViTModel`` (task models such as ``ViTForImageClassification`` keep none)."""
    c = config_dict(config)
    if c.get("add_pooling_layer") is not None:
        return bool(c["add_pooling_layer"])
    return all(a == "ViTModel" for a in c.get("architectures") or ["ViTModel"])


def build(config: Any) -> ViTModel:
    return ViTModel(config, add_pooling_layer=has_pooler(config))


def preprocessing(config: Any) -> dict:
    """``ViTImageProcessor``: resized straight to the config's ``image_size``, mean = std = 0.5."""
    return {"size": pair(config_dict(config, DEFAULTS)["image_size"])[0], "crop_pct": None, "mean": (0.5,) * 3,
            "std": (0.5,) * 3, "resample": "bilinear"}


def feature_layers(config: Any) -> tuple[str, ...]:
    n = int(config_dict(config, DEFAULTS)["num_hidden_layers"])
    return ("embeddings", *(f"encoder/layer/{i}" for i in range(n)))


registry.register(registry.Family(
    model_type="vit",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"encoder/layer/(\d+)/",
    num_layers=lambda config: int(config_dict(config, DEFAULTS)["num_hidden_layers"]),
    base_model_prefix="vit",
    default_pooling="cls",
    key_map=tuple(KEY_MAP),
    task_heads={"ViTForImageClassification": lambda n, config: heads.Classifier(n, pooling="cls")},
    feature_layers=feature_layers,
    preprocessing=preprocessing,
))

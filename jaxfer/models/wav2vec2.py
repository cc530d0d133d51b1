"""wav2vec 2.0 (speech encoder on raw waveforms) in flax.linen, in the HF layout.

Params (paths as in HF's ``Wav2Vec2Model``; under ``wav2vec2/`` when a head is attached)::

    feature_extractor/conv_layers/<i>/conv/{kernel,bias}    1-D convs on the waveform, kernel (k, in, out)
    feature_extractor/conv_layers/<i>/layer_norm/...        every layer ("layer"), or GroupNorm on layer 0 ("group")
    feature_projection/{layer_norm,projection}/...          conv features -> hidden size
    masked_spec_embed                                       SpecAugment's mask vector (when the config masks)
    encoder/pos_conv_embed/conv/{weight_g,weight_v,bias}    weight-normalised grouped positional conv
    encoder/layer_norm/{scale,bias}
    encoder/layers/<i>/attention/{q,k,v,out}_proj/...
    encoder/layers/<i>/{layer_norm,final_layer_norm}/..., feed_forward/{intermediate,output}_dense/...

The computation (HF's, ``config`` a ``Wav2Vec2Config`` or its dict)::

    x = conv_L(... act(norm(conv_0(waveform))))                    (B, T, conv_dim[-1]), T frames
    f = layer_norm(x); h = dropout(projection(f))                  extract_features = f
    h[~frame_mask] = 0; h = h + gelu(same_pad(conv_wn(h)))         conv_wn: weight = g * v / ||v||
    post-norm (do_stable_layer_norm False): h = layer_norm(h); per layer
        h = LN(h + attn(h)); h = final_LN(h + ff(h))
    pre-norm  (do_stable_layer_norm True):  per layer
        h = h + attn(LN(h)); h = h + ff(final_LN(h));  then h = layer_norm(h)

``||v||`` is taken per kernel position (torch's ``weight_norm(dim=2)``). A waveform's
``attention_mask`` ``(B, L)`` becomes the ``frame_mask`` ``(B, T)`` from each row's
length through every conv (``L -> floor((L - k) / s) + 1``), which masks attention and is
returned for the heads (:class:`~jaxfer.models.heads.CTCHead`,
:class:`~jaxfer.models.heads.UtteranceClassifier`) and the CTC loss. In training, with
``mask_time_prob > 0`` and ``apply_spec_augment`` (HF's defaults), spans of
``mask_time_length`` frames (``mask_time_prob * T / mask_time_length`` of them, at least
``mask_time_min_masks``) take ``masked_spec_embed``, and ``mask_feature_prob`` zeroes
spans of channels: SpecAugment, drawn from the ``dropout`` rng. ``layerdrop`` is not
applied (every layer always runs) and HF's ``add_adapter`` is not supported.

``KEY_MAP`` converts torch names; the positional conv's ``weight_g``/``weight_v`` come
from old (``weight_g``) and new (``parametrizations.weight.original0``) checkpoints alike.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer.models import heads, registry
from jaxfer.models.common import (LayerStack, activation, attend, config_dict, dense, merge_heads, padding_bias,
                                  split_heads)
from jaxfer.models.keymap import KeyRule, apply_key_map

DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", hidden_dropout=0.1, activation_dropout=0.1, attention_dropout=0.1,
                feat_proj_dropout=0.0, final_dropout=0.1, layer_norm_eps=1e-5, initializer_range=0.02,
                feat_extract_norm="group", feat_extract_activation="gelu",
                conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                conv_bias=False, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                do_stable_layer_norm=False, apply_spec_augment=True, mask_time_prob=0.05, mask_time_length=10,
                mask_time_min_masks=2, mask_feature_prob=0.0, mask_feature_length=10, mask_feature_min_masks=0,
                vocab_size=32, pad_token_id=0, classifier_proj_size=256, use_weighted_layer_sum=False,
                add_adapter=False)


def _config(config: Any) -> dict:
    c = config_dict(config, DEFAULTS)
    if c["add_adapter"]:
        raise ValueError("wav2vec2 with add_adapter=True (an adapter after the encoder) is not supported")
    if c["feat_extract_norm"] not in ("group", "layer"):
        raise ValueError(f"feat_extract_norm must be 'group' or 'layer', got {c['feat_extract_norm']!r}")
    if not len(c["conv_dim"]) == len(c["conv_kernel"]) == len(c["conv_stride"]):
        raise ValueError(f"conv_dim, conv_kernel and conv_stride differ in length: {c['conv_dim']}, "
                         f"{c['conv_kernel']}, {c['conv_stride']}")
    return c


def output_lengths(lengths, config: Any):
    """Frames out of the feature encoder for waveforms of ``lengths`` samples (numpy or jax)."""
    c = _config(config)
    for k, s in zip(c["conv_kernel"], c["conv_stride"]):
        lengths = (lengths - k) // s + 1
    return lengths


def frame_mask(attention_mask, num_frames: int, config: Any) -> jax.Array:
    """Sample-level ``attention_mask`` ``(B, L)`` -> frame-level ``(B, num_frames)`` bool: frame
    ``t`` is real iff ``t < output_lengths(sum(mask))`` (HF's ``_get_feature_vector_attention_mask``)."""
    n = output_lengths(jnp.sum(jnp.asarray(attention_mask), axis=-1).astype(jnp.int32), config)
    return jnp.arange(num_frames)[None, :] < n[:, None]


class ConvLayer(nn.Module):
    c: Mapping
    layer: int

    @nn.compact
    def __call__(self, x):
        c, i = self.c, self.layer
        x = nn.Conv(c["conv_dim"][i], (c["conv_kernel"][i],), strides=(c["conv_stride"][i],), padding="VALID",
                    use_bias=c["conv_bias"], kernel_init=nn.initializers.he_normal(), name="conv")(x)
        if c["feat_extract_norm"] == "layer":
            x = nn.LayerNorm(epsilon=1e-5, name="layer_norm")(x)
        elif i == 0:  # one group per channel: each channel normalised over time
            x = nn.GroupNorm(num_groups=c["conv_dim"][0], epsilon=1e-5, name="layer_norm")(x)
        return activation(c["feat_extract_activation"])(x)


class FeatureEncoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, waveform):
        c = self.c
        states = LayerStack(lambda i, name: ConvLayer(c, i, name=name), len(c["conv_dim"]), name="conv_layers")(
            waveform[..., None])
        return states[-1]


class WeightNormConv(nn.Module):
    """Grouped 1-D conv ``(B, T, H) -> (B, T, H)``, ``k // 2`` padding each side (the last frame
    dropped for even ``k``), kernel ``weight_g * weight_v / ||weight_v||`` with the norm taken
    per kernel position (``weight_v`` ``(k, H / groups, H)``, ``weight_g`` ``(k, 1, 1)``)."""

    features: int
    kernel: int
    groups: int

    @nn.compact
    def __call__(self, x):
        k, h = self.kernel, self.features
        std = 2.0 / np.sqrt(k * h / self.groups)
        v = self.param("weight_v", nn.initializers.normal(std), (k, x.shape[-1] // self.groups, h), jnp.float32)
        g = self.param("weight_g", lambda _, shape: jnp.sqrt(jnp.sum(v ** 2, axis=(1, 2), keepdims=True)),
                       (k, 1, 1))
        bias = self.param("bias", nn.initializers.zeros, (h,), jnp.float32)
        kernel = g * v * jax.lax.rsqrt(jnp.sum(v ** 2, axis=(1, 2), keepdims=True))
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1,), [(k // 2, k // 2)],
                                         dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
        y = y + bias.astype(x.dtype)
        return y[:, :-1] if k % 2 == 0 else y


class PositionalConvEmbedding(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, h):
        c = self.c
        conv = WeightNormConv(c["hidden_size"], c["num_conv_pos_embeddings"], c["num_conv_pos_embedding_groups"],
                              name="conv")
        return activation(c["feat_extract_activation"])(conv(h))


class FeedForward(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        std = c["initializer_range"]
        y = activation(c["hidden_act"])(dense(c["intermediate_size"], std, "intermediate_dense")(x))
        y = nn.Dropout(c["activation_dropout"])(y, deterministic=deterministic)
        y = dense(c["hidden_size"], std, "output_dense")(y)
        return nn.Dropout(c["hidden_dropout"])(y, deterministic=deterministic)


class Attention(nn.Module):
    """HF's ``Wav2Vec2Attention``: ``q/k/v_proj`` and ``out_proj`` in one scope, heads mixed by
    :func:`~jaxfer.models.common.attend`."""

    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        h, n, std = c["hidden_size"], c["num_attention_heads"], c["initializer_range"]
        q, k, v = (split_heads(dense(h, std, f"{name}_proj")(x), n) for name in "qkv")
        a = attend(q, k, v, bias, dropout=functools.partial(nn.Dropout(c["attention_dropout"]),
                                                           deterministic=deterministic))
        return dense(h, std, "out_proj")(merge_heads(a))


class EncoderLayer(nn.Module):
    """One transformer layer, post-norm or pre-norm (``do_stable_layer_norm``)."""

    c: Mapping

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        c = self.c
        norm = functools.partial(nn.LayerNorm, epsilon=c["layer_norm_eps"])
        attn = Attention(c, name="attention")
        drop = nn.Dropout(c["hidden_dropout"])
        ff = FeedForward(c, name="feed_forward")
        if c["do_stable_layer_norm"]:
            x = x + drop(attn(norm(name="layer_norm")(x), bias, deterministic), deterministic=deterministic)
            return x + ff(norm(name="final_layer_norm")(x), deterministic)
        x = norm(name="layer_norm")(x + drop(attn(x, bias, deterministic), deterministic=deterministic))
        return norm(name="final_layer_norm")(x + ff(x, deterministic))


class FeatureProjection(nn.Module):
    """``f = layer_norm(x)``, ``h = dropout(projection(f))``; returns ``(f, h)``."""

    c: Mapping

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.c
        f = nn.LayerNorm(epsilon=c["layer_norm_eps"], name="layer_norm")(x)
        h = dense(c["hidden_size"], c["initializer_range"], "projection")(f)
        return f, nn.Dropout(c["feat_proj_dropout"])(h, deterministic=deterministic)


class Encoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, h, mask, deterministic: bool):
        c = self.c
        h = jnp.where(mask[..., None], h, 0.0)  # padded frames carry nothing into the positional conv
        h = h + PositionalConvEmbedding(c, name="pos_conv_embed")(h)
        norm = nn.LayerNorm(epsilon=c["layer_norm_eps"], name="layer_norm")
        if not c["do_stable_layer_norm"]:
            h = norm(h)
        h = nn.Dropout(c["hidden_dropout"])(h, deterministic=deterministic)
        bias = padding_bias(mask, h.dtype)
        states = LayerStack(lambda i, name: EncoderLayer(c, name=name), c["num_hidden_layers"], name="layers")(
            h, bias, deterministic)
        return states, (norm(states[-1]) if c["do_stable_layer_norm"] else states[-1])


def span_mask(rng, shape: tuple[int, int], prob: float, length: int, min_masks: int, valid=None) -> jax.Array:
    """SpecAugment spans: ``(B, N)`` bool with ``max(floor(prob * N / length + u), min_masks)``
    spans of ``length`` positions per row, ``u ~ U[0, 1)`` per row (HF's ``_compute_mask_indices``:
    ``prob * N / length`` spans on average), starts uniform in ``[0, N - length]``, spans may
    overlap; ``valid`` (``(B, N)``) limits them to real positions."""
    b, n = shape
    length = min(length, n)
    mean = prob * n / length
    most = max(int(np.ceil(mean)), min_masks)
    if most == 0:
        return jnp.zeros(shape, bool)
    k_count, k_start = jax.random.split(rng)
    count = jnp.maximum(jnp.floor(mean + jax.random.uniform(k_count, (b, 1))), min_masks)   # (B, 1)
    starts = jax.random.randint(k_start, (b, most), 0, n - length + 1)
    used = jnp.arange(most)[None, :] < count                                                 # (B, most)
    pos = jnp.arange(n)[None, None, :]
    mask = (used[..., None] & (pos >= starts[..., None]) & (pos < starts[..., None] + length)).any(axis=1)
    return mask if valid is None else mask & valid


class Wav2Vec2Model(nn.Module):
    """The wav2vec2 backbone (see the module doc). ``config``: a HF ``Wav2Vec2Config`` or its dict.

    ``__call__(input_values, attention_mask=None, *, train=False, output_hidden_states=False)``
    on waveforms ``(B, L)`` (float, normalised per utterance as HF's feature extractor does)
    -> dict with ``last_hidden_state`` ``(B, T, H)``, ``extract_features`` ``(B, T, conv_dim[-1])``
    (the normed conv features), ``frame_mask`` ``(B, T)`` (1 = a frame of real audio) and,
    when asked, ``hidden_states``: the encoder's input (after the positional conv, and the
    layer norm when post-norm), then every layer's output (as HF: when pre-norm, the last
    one before the encoder's final layer norm, which ``last_hidden_state`` has had). Dropout and SpecAugment act only with ``train=True``
    (``rngs={"dropout": key}``).
    """

    config: Any

    @nn.compact
    def __call__(self, input_values, attention_mask=None, *, train: bool = False,
                 output_hidden_states: bool = False):
        c = _config(self.config)
        det = not train
        x = jnp.asarray(input_values)
        if x.ndim != 2:
            raise ValueError(f"input_values must be waveforms (batch, samples), got shape {x.shape}")
        x = FeatureEncoder(c, name="feature_extractor")(x)
        t = x.shape[1]
        mask = (jnp.ones(x.shape[:2], bool) if attention_mask is None else frame_mask(attention_mask, t, c))
        f, h = FeatureProjection(c, name="feature_projection")(x, det)
        h = self._spec_augment(c, h, mask, train)
        states, last = Encoder(c, name="encoder")(h, mask, det)
        out = {"last_hidden_state": last, "extract_features": f, "frame_mask": mask.astype(jnp.int32)}
        if output_hidden_states:
            out["hidden_states"] = tuple(states)
        return out

    def _spec_augment(self, c, h, mask, train: bool):
        masks_time = c["mask_time_prob"] > 0 and c["apply_spec_augment"]
        if c["mask_time_prob"] > 0 or c["mask_feature_prob"] > 0:  # HF creates it in both cases
            embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0), (c["hidden_size"],), jnp.float32)
        if not train or not c["apply_spec_augment"]:
            return h
        b, t, d = h.shape
        if masks_time:
            spans = span_mask(self.make_rng("dropout"), (b, t), c["mask_time_prob"], c["mask_time_length"],
                              c["mask_time_min_masks"], mask)
            h = jnp.where(spans[..., None], embed.astype(h.dtype), h)
        if c["mask_feature_prob"] > 0:
            spans = span_mask(self.make_rng("dropout"), (b, d), c["mask_feature_prob"], c["mask_feature_length"],
                              c["mask_feature_min_masks"])
            h = jnp.where(spans[:, None, :], 0.0, h)
        return h


# ------------------------------------------------------------------ key map
_WN = r"encoder\.pos_conv_embed\.conv"
KEY_MAP = [
    KeyRule(r"(feature_extractor\.conv_layers\.\d+\.conv)\.weight", r"\1/kernel", "conv", ndim=3),
    KeyRule(_WN + r"\.weight_g", "encoder/pos_conv_embed/conv/weight_g", "conv", ndim=3),
    KeyRule(_WN + r"\.weight_v", "encoder/pos_conv_embed/conv/weight_v", "conv", ndim=3),
    KeyRule(_WN + r"\.parametrizations\.weight\.original0", "encoder/pos_conv_embed/conv/weight_g", "conv"),
    KeyRule(_WN + r"\.parametrizations\.weight\.original1", "encoder/pos_conv_embed/conv/weight_v", "conv"),
    KeyRule(r"(.*(?:layer_norm|final_layer_norm))\.weight", r"\1/scale", "norm_scale", ndim=1),
    KeyRule(r"(.*)\.weight", r"\1/kernel", "linear", ndim=2),
    KeyRule(r"(.*)\.bias", r"\1/bias", ndim=1),
    KeyRule(r"masked_spec_embed", "masked_spec_embed"),
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    c = _config(config)
    samples = 1
    for k, s in zip(reversed(c["conv_kernel"]), reversed(c["conv_stride"])):
        samples = (samples - 1) * s + k  # the shortest waveform giving one frame
    wave = np.zeros((1, max(samples, 400)), np.float32)
    return {"input_values": wave, "attention_mask": np.ones(wave.shape, np.int32)}


def build(config: Any) -> Wav2Vec2Model:
    _config(config)  # unsupported variants fail here, before any weights are read
    return Wav2Vec2Model(config)


def layer_stacks(config: Any) -> tuple[tuple[str, int], ...]:
    """The feature encoder's conv layers, then the transformer layers (one numbering)."""
    c = _config(config)
    return ((r"(?:^|/)feature_extractor/conv_layers/(\d+)(?:/|$)", len(c["conv_dim"])),
            (r"(?:^|/)encoder/layers/(\d+)(?:/|$)", int(c["num_hidden_layers"])))


def _ctc_head(n: int, config: Any) -> heads.CTCHead:
    """``Wav2Vec2ForCTC``'s head: ``vocab_size`` outputs (``num_labels`` is not its size)."""
    c = config_dict(config, DEFAULTS)
    return heads.CTCHead(int(c["vocab_size"]), blank_id=int(c["pad_token_id"]))


def _utterance_head(n: int, config: Any) -> heads.UtteranceClassifier:
    c = config_dict(config, DEFAULTS)
    if c["use_weighted_layer_sum"]:
        raise ValueError("Wav2Vec2ForSequenceClassification with use_weighted_layer_sum=True is not supported")
    return heads.UtteranceClassifier(n, projection_size=int(c["classifier_proj_size"]))


# the task checkpoints' own heads, beside the backbone prefix: lm_head (CTC), projector + classifier
HEAD_MAP = [
    KeyRule(r"lm_head\.weight", "classifier/kernel", "linear", ndim=2),
    KeyRule(r"lm_head\.bias", "classifier/bias"),
    KeyRule(r"projector\.weight", "classifier/projector/kernel", "linear", ndim=2),
    KeyRule(r"projector\.bias", "classifier/projector/bias"),
    KeyRule(r"classifier\.weight", "classifier/out/kernel", "linear", ndim=2),
    KeyRule(r"classifier\.bias", "classifier/out/bias"),
]

registry.register(registry.Family(
    model_type="wav2vec2",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"(?:^|/)feature_extractor/conv_layers/(\d+)(?:/|$)",
    num_layers=lambda config: sum(n for _, n in layer_stacks(config)),
    base_model_prefix="wav2vec2",
    default_pooling="mean",
    head_map=tuple(HEAD_MAP),
    key_map=tuple(KEY_MAP),
    task_heads={"Wav2Vec2ForCTC": _ctc_head, "Wav2Vec2ForSequenceClassification": _utterance_head},
    layer_stacks=layer_stacks,
))

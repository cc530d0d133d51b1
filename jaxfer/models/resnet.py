"""ResNet (Hugging Face ``ResNetModel``: microsoft/resnet-* checkpoints) in flax.linen.

Params use the Hugging Face Flax layout; batch-norm running statistics live in
the ``batch_stats`` collection::

    embedder/embedder/convolution/kernel                     (7, 7, C, E)
    embedder/embedder/normalization/{scale,bias}             + batch_stats .../{mean,var}
    encoder/stages/<i>/layers/<j>/shortcut/{convolution,normalization}/...   (when needed)
    encoder/stages/<i>/layers/<j>/layer/<k>/{convolution,normalization}/...

``<k>`` runs over the two 3x3 convs of a ``basic`` layer or the 1x1, 3x3, 1x1 convs
of a ``bottleneck`` layer. ``KEY_MAP`` converts PyTorch/safetensors names
(``encoder.stages.0.layers.0.layer.1.normalization.running_var``).

Semantics follow torch exactly: convs pad ``k // 2`` on every side (not ``"SAME"``,
which pads stride-2 convs asymmetrically), the stem max-pool pads with ``-inf``,
batch norm uses ``eps=1e-5`` and flax ``momentum=0.9`` (torch's ``0.1``). One
difference remains in training: torch updates the running variance with the
unbiased batch variance, flax with the biased one (a factor ``n / (n - 1)``,
``n = B * H * W``).

``train=True`` normalises with batch statistics and updates ``batch_stats``, so
call ``apply(..., train=True, mutable=["batch_stats"])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.weights.keymap import Rule, apply_key_map, batch_norm

# transformers.ResNetConfig defaults (ResNet-50), for plain-dict configs.
DEFAULTS = dict(
    num_channels=3, embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3),
    layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
    downsample_in_bottleneck=False,
)
BN_MOMENTUM = 0.9  # flax convention: 1 - torch momentum (0.1)
BN_EPS = 1e-5

_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "silu": nn.silu,
    "swish": nn.silu,
    "leaky_relu": nn.leaky_relu,
}


def config_dict(config: Any) -> dict:
    """HF ``ResNetConfig`` or dict -> a plain dict with every field the model reads."""
    c = dict(config) if isinstance(config, Mapping) else config.to_dict()
    out = {**DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    out["hidden_sizes"], out["depths"] = tuple(out["hidden_sizes"]), tuple(out["depths"])
    return out


# ------------------------------------------------------------------- modules
class ConvLayer(nn.Module):
    """HF's ``ResNetConvLayer``: conv (no bias, torch padding) -> batch norm -> activation."""

    features: int
    kernel: int = 3
    stride: int = 1
    activation: str | None = "relu"

    @nn.compact
    def __call__(self, x, train: bool):
        p = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=((p, p), (p, p)),
                    use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name="convolution")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                         name="normalization")(x)
        return x if self.activation is None else _ACTIVATIONS[self.activation](x)


class ConvStack(nn.Module):
    """The ``layer`` scope of a residual block: ``ConvLayer``\\ s ``0``, ``1``, ... in sequence.

    ``specs``: ``(features, kernel, stride, activation)`` per conv.
    """

    specs: tuple[tuple[int, int, int, str | None], ...]

    @nn.compact
    def __call__(self, x, train: bool):
        for k, (features, kernel, stride, act) in enumerate(self.specs):
            x = ConvLayer(features, kernel, stride, act, name=str(k))(x, train)
        return x


def block_specs(c: Mapping, out_ch: int, stride: int) -> tuple:
    """Conv specs of one residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1)."""
    act = c["hidden_act"]
    if c["layer_type"] == "basic":
        return ((out_ch, 3, stride, act), (out_ch, 3, 1, None))
    mid = out_ch // 4
    first = stride if c["downsample_in_bottleneck"] else 1
    return ((mid, 1, first, act), (mid, 3, stride // first, act), (out_ch, 1, 1, None))


class ResidualLayer(nn.Module):
    """``act(layer(x) + shortcut(x))``; the shortcut is a strided 1x1 conv + BN when the
    channel count or the resolution changes, the identity otherwise."""

    c: Mapping
    in_ch: int
    out_ch: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        residual = x
        if self.in_ch != self.out_ch or self.stride != 1:
            residual = ConvLayer(self.out_ch, 1, self.stride, None, name="shortcut")(x, train)
        y = ConvStack(block_specs(self.c, self.out_ch, self.stride), name="layer")(x, train)
        return _ACTIVATIONS[self.c["hidden_act"]](y + residual)


class Layers(nn.Module):
    """The ``layers`` scope of a stage: the first layer may change channels and stride."""

    c: Mapping
    in_ch: int
    out_ch: int
    stride: int
    depth: int

    @nn.compact
    def __call__(self, x, train: bool):
        for j in range(self.depth):
            x = ResidualLayer(self.c, self.in_ch if j == 0 else self.out_ch, self.out_ch,
                              self.stride if j == 0 else 1, name=str(j))(x, train)
        return x


class Stage(nn.Module):
    c: Mapping
    in_ch: int
    out_ch: int
    stride: int
    depth: int

    @nn.compact
    def __call__(self, x, train: bool):
        return Layers(self.c, self.in_ch, self.out_ch, self.stride, self.depth, name="layers")(x, train)


class Stages(nn.Module):
    """The ``stages`` scope holding stages ``0``, ``1``, ...; returns every state."""

    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.c
        ins = (c["embedding_size"], *c["hidden_sizes"][:-1])
        states = [x]
        for i, (in_ch, out_ch, depth) in enumerate(zip(ins, c["hidden_sizes"], c["depths"])):
            stride = 2 if i > 0 or c["downsample_in_first_stage"] else 1
            states.append(Stage(c, in_ch, out_ch, stride, depth, name=str(i))(states[-1], train))
        return states


class Encoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        return Stages(self.c, name="stages")(x, train)


class Embeddings(nn.Module):
    """Stem: 7x7 stride-2 conv + BN + act, then 3x3 stride-2 max-pool padded with ``-inf``."""

    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvLayer(self.c["embedding_size"], 7, 2, self.c["hidden_act"], name="embedder")(x, train)
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class ResNetModel(nn.Module):
    """ResNet backbone. ``config``: a HF ``ResNetConfig`` or its dict.

    ``__call__(pixel_values, *, train=False, output_hidden_states=False)`` with
    ``pixel_values`` ``(B, C, H, W)`` -> dict with, in HF's NCHW layout,
    ``last_hidden_state`` ``(B, C', H', W')``, ``pooler_output`` ``(B, C', 1, 1)``
    (global average pool) and, when asked, ``hidden_states`` (stem output then
    every stage's output). ``train=True`` uses batch statistics and needs
    ``mutable=["batch_stats"]``.
    """

    config: Any

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False, output_hidden_states: bool = False):
        c = config_dict(self.config)
        x = jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1))  # NCHW -> NHWC
        x = Embeddings(c, name="embedder")(x, train)
        states = Encoder(c, name="encoder")(x, train)
        last = states[-1]
        out = {
            "last_hidden_state": _nchw(last),
            "pooler_output": _nchw(jnp.mean(last, axis=(1, 2), keepdims=True)),
        }
        if output_hidden_states:
            out["hidden_states"] = tuple(_nchw(s) for s in states)
        return out


# ------------------------------------------------------------------ key map
_CONV_LAYER = r"(embedder\.embedder|encoder\.stages\.\d+\.layers\.\d+\.(?:shortcut|layer\.\d+))"
KEY_MAP = [
    Rule(_CONV_LAYER + r"\.convolution\.weight", r"\1/convolution/kernel", "conv", ndim=4),
    *batch_norm(_CONV_LAYER + r"\.normalization", r"\1/normalization"),
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """Backbone ``state_dict`` (``resnet.`` stripped) -> ``({"params": ..., "batch_stats": ...}, unused)``."""
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    return {"pixel_values": np.zeros((1, config_dict(config)["num_channels"], 32, 32), np.float32)}


def build(config: Any) -> ResNetModel:
    return ResNetModel(config)


registry.register(registry.Family(
    model_type="resnet",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"encoder/stages/(\d+)/",
    num_layers=lambda config: len(config_dict(config)["depths"]),
    base_model_prefix="resnet",
    default_pooling="pooler",
))

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

Semantics follow torch exactly (:mod:`jaxfer.models.common`'s ``torch_*`` layers):
convs pad ``k // 2`` on every side (not ``"SAME"``, which pads stride-2 convs
asymmetrically), the stem max-pool pads with ``-inf``, batch norm uses
``eps=1e-5`` and flax ``momentum=0.9`` (torch's ``0.1``). One difference remains
in training: torch updates the running variance with the unbiased batch
variance, flax with the biased one (a factor ``n / (n - 1)``, ``n = B * H * W``).

``train=True`` normalises with batch statistics and updates ``batch_stats``, so
call ``apply(..., train=True, mutable=["batch_stats"])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import heads, registry
from jaxfer.models.common import LayerStack, activation, config_dict, to_nchw, to_nhwc, torch_batch_norm, \
    torch_conv, torch_max_pool
from jaxfer.models.keymap import KeyRule, apply_key_map, batch_norm

# transformers.ResNetConfig defaults (ResNet-50), for plain-dict configs.
DEFAULTS = dict(
    num_channels=3, embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3),
    layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
    downsample_in_bottleneck=False,
)


# ------------------------------------------------------------------- modules
class ConvLayer(nn.Module):
    """HF's ``ResNetConvLayer``: conv (no bias, torch padding) -> batch norm -> activation."""

    features: int
    kernel: int = 3
    stride: int = 1
    act: str | None = "relu"

    @nn.compact
    def __call__(self, x, train: bool):
        x = torch_conv(self.features, self.kernel, self.stride, name="convolution")(x)
        x = torch_batch_norm(train, "normalization")(x)
        return x if self.act is None else activation(self.act)(x)


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
        return activation(self.c["hidden_act"])(y + residual)


class Stage(nn.Module):
    """One stage: residual layers ``layers/<j>``; the first may change channels and stride."""

    c: Mapping
    in_ch: int
    out_ch: int
    stride: int
    depth: int

    @nn.compact
    def __call__(self, x, train: bool):
        def layer(j, name):
            return ResidualLayer(self.c, self.in_ch if j == 0 else self.out_ch, self.out_ch,
                                 self.stride if j == 0 else 1, name=name)

        return LayerStack(layer, self.depth, name="layers")(x, train)[-1]


class Encoder(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.c
        ins = (c["embedding_size"], *c["hidden_sizes"][:-1])

        def stage(i, name):
            stride = 2 if i > 0 or c["downsample_in_first_stage"] else 1
            return Stage(c, ins[i], c["hidden_sizes"][i], stride, c["depths"][i], name=name)

        return LayerStack(stage, len(c["depths"]), name="stages")(x, train)


class Embeddings(nn.Module):
    """Stem: 7x7 stride-2 conv + BN + act, then 3x3 stride-2 max-pool padded with ``-inf``."""

    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        x = ConvLayer(self.c["embedding_size"], 7, 2, self.c["hidden_act"], name="embedder")(x, train)
        return torch_max_pool(x, 3, 2, 1)


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
        c = config_dict(self.config, DEFAULTS)
        x = Embeddings(c, name="embedder")(to_nhwc(pixel_values), train)
        states = Encoder(c, name="encoder")(x, train)
        last = states[-1]
        out = {
            "last_hidden_state": to_nchw(last),
            "pooler_output": to_nchw(jnp.mean(last, axis=(1, 2), keepdims=True)),
        }
        if output_hidden_states:
            out["hidden_states"] = tuple(to_nchw(s) for s in states)
        return out


# ------------------------------------------------------------------ key map
_CONV_LAYER = r"(embedder\.embedder|encoder\.stages\.\d+\.layers\.\d+\.(?:shortcut|layer\.\d+))"
KEY_MAP = [
    KeyRule(_CONV_LAYER + r"\.convolution\.weight", r"\1/convolution/kernel", "conv", ndim=4),
    *batch_norm(_CONV_LAYER + r"\.normalization", r"\1/normalization"),
]


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """Backbone ``state_dict`` (``resnet.`` stripped) -> ``({"params": ..., "batch_stats": ...}, unused)``."""
    return apply_key_map(KEY_MAP, state_dict)


def dummy_inputs(config: Any) -> dict:
    return {"pixel_values": np.zeros((1, config_dict(config, DEFAULTS)["num_channels"], 32, 32), np.float32)}


def build(config: Any) -> ResNetModel:
    return ResNetModel(config)


def preprocessing(config: Any) -> dict:
    """microsoft/resnet-*'s ``ConvNextImageProcessor``: shorter side 224 / 0.875, centre crop
    224, ImageNet mean/std, bicubic."""
    return {"size": 224, "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "resample": "bicubic"}


def feature_layers(config: Any) -> tuple[str, ...]:
    return ("embedder", *(f"encoder/stages/{i}" for i in range(len(config_dict(config, DEFAULTS)["depths"]))))


registry.register(registry.Family(
    model_type="resnet",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"encoder/stages/(\d+)/",
    num_layers=lambda config: len(config_dict(config, DEFAULTS)["depths"]),
    base_model_prefix="resnet",
    default_pooling="pooler",
    key_map=tuple(KEY_MAP),
    # Sequential(Flatten, Linear): the Linear is classifier.1
    task_heads={"ResNetForImageClassification":
                lambda n, config: heads.Classifier(n, pooling="pooler", dense_name="1")},
    feature_layers=feature_layers,
    preprocessing=preprocessing,
))

"""EfficientNet-Lite (lite0 .. lite4) in flax.linen, loading the ``efficientnet_lite_pytorch`` state dict.

The Lite family (Tan & Le 2019, ``efficientnet/lite`` in the TF repo) is
EfficientNet without squeeze-excitation, with ReLU6 and with an unscaled stem
and head. One network, scaled by ``(width, depth)`` per variant::

    lite0 (1.0, 1.0) 224px   lite1 (1.0, 1.1) 240px   lite2 (1.1, 1.2) 260px
    lite3 (1.2, 1.4) 280px   lite4 (1.4, 1.8) 300px

Stage ``s`` of the base network is ``repeats`` MBConv blocks (kernel, stride
of its first block, expand ratio, output channels), see :data:`BLOCKS`.
Width scaling rounds ``channels * width`` to a multiple of 8 (never below 90%
of it); depth scaling makes ``ceil(repeats * depth)`` blocks, except in the
first and last stage (kept, like the stem's 32 and the head's 1280 channels).

An MBConv block is ``x + project(depthwise(expand(x)))`` (the residual only when
the stride is 1 and the channels stay): ``expand`` a 1x1 conv to ``in * ratio``
channels (absent for ratio 1), ``depthwise`` a ``k x k`` conv per channel,
``project`` a 1x1 conv back down, each with batch norm (``eps=1e-3``, flax
momentum ``0.99`` = torch's ``0.01``) and ReLU6 except after ``project``. In
training the residual branch is dropped per example (stochastic depth,
``drop_connect_rate * block / blocks``). Convs pad like TensorFlow's
``"SAME"`` (:func:`~jaxfer.models.common.same_conv`), as the checkpoint's
``Conv2dStaticSamePadding`` does at its image size.

Params (``batch_stats`` holds the BN running statistics at the same paths)::

    stem/conv/kernel (3, 3, C, 32)      stem/bn/{scale,bias}
    blocks/<s>/<j>/{expand,depthwise,project}/{conv/kernel, bn/...}
    top/conv/kernel (1, 1, 320*, 1280)  top/bn/{scale,bias}

The checkpoint's ImageNet classifier ``_fc`` loads into a ``Classifier(1000)``
head (``classifier/{kernel,bias}``); a head of another size needs
``reinit=["classifier/**"]``. A ``.pth`` state dict has no ``config.json``: name
the family, ``jaxfer.load(path, config={"model_type": "efficientnet_lite",
"variant": "lite0"})``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.models.common import DropPath, activation, config_dict, same_conv, to_nchw, to_nhwc, \
    torch_batch_norm
from jaxfer.models.keymap import KeyRule, apply_key_map, batch_norm

MODEL_TYPE = "efficientnet_lite"

# (width, depth, resolution, dropout) -- efficientnet_lite_builder.py
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
# Stages of the base network: (repeats, kernel, stride, expand ratio, output channels).
BLOCKS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

DEFAULTS = dict(
    variant="lite0", width_coefficient=None, depth_coefficient=None, image_size=None, dropout_rate=None,
    drop_connect_rate=0.2, num_channels=3, stem_features=32, head_features=1280, blocks=BLOCKS,
    depth_divisor=8, fix_head_stem=True, hidden_act="relu6", batch_norm_eps=1e-3, batch_norm_momentum=0.99,
)


# ------------------------------------------------------------------- config
def resolve(config: Any) -> dict:
    """A config (dict with ``variant``, or overrides) -> every field filled in.

    ``width_coefficient``, ``depth_coefficient``, ``image_size`` and
    ``dropout_rate`` left ``None`` come from the variant's row of :data:`VARIANTS`.
    """
    c = config_dict(config, DEFAULTS)
    if c["variant"] not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {c['variant']!r}; known: {', '.join(VARIANTS)}")
    for key, value in zip(("width_coefficient", "depth_coefficient", "image_size", "dropout_rate"),
                          VARIANTS[c["variant"]]):
        if c.get(key) is None:
            c[key] = value
    return c


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor`` (at least
    ``divisor``), plus one ``divisor`` if that lost more than 10%."""
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(out + divisor if out < 0.9 * scaled else out)


def stages(config: Any) -> list[dict]:
    """Per stage: ``repeats, kernel, stride, expand, in_ch, out_ch`` after width/depth scaling."""
    c = resolve(config)
    w, d, div, fixed = c["width_coefficient"], c["depth_coefficient"], c["depth_divisor"], c["fix_head_stem"]
    in_ch = c["stem_features"] if fixed else round_filters(c["stem_features"], w, div)
    out = []
    for s, (repeats, kernel, stride, expand, out_ch) in enumerate(c["blocks"]):
        edge = s in (0, len(c["blocks"]) - 1)
        n = repeats if fixed and edge else int(math.ceil(d * repeats))
        out_ch = round_filters(out_ch, w, div)
        out.append(dict(repeats=n, kernel=kernel, stride=stride, expand=expand, in_ch=in_ch, out_ch=out_ch))
        in_ch = out_ch
    return out


def head_features(config: Any) -> int:
    c = resolve(config)
    return c["head_features"] if c["fix_head_stem"] else round_filters(c["head_features"], c["width_coefficient"],
                                                                       c["depth_divisor"])


# ------------------------------------------------------------------ modules
class ConvBN(nn.Module):
    """TF-``"SAME"`` conv (no bias) -> batch norm -> activation (``act=None``: none);
    ``depthwise``: one ``kernel x kernel`` filter per channel."""

    c: Mapping
    features: int
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False
    act: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        groups = self.features if self.depthwise else 1
        x = same_conv(self.features, self.kernel, self.stride, groups=groups, name="conv")(x)
        x = torch_batch_norm(train, "bn", eps=self.c["batch_norm_eps"], momentum=self.c["batch_norm_momentum"])(x)
        return activation(self.c["hidden_act"])(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: ``x + project(depthwise(expand(x)))`` when shapes allow."""

    c: Mapping
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        mid = self.in_ch * self.expand
        y = ConvBN(self.c, mid, name="expand")(x, train) if self.expand != 1 else x
        y = ConvBN(self.c, mid, self.kernel, self.stride, depthwise=True, name="depthwise")(y, train)
        y = ConvBN(self.c, self.out_ch, act=False, name="project")(y, train)
        if self.stride != 1 or self.in_ch != self.out_ch:
            return y
        y = DropPath(self.drop_rate, name="drop_path")(y, deterministic=not train)
        return x + y


class Stage(nn.Module):
    """Blocks ``0 .. repeats - 1`` of one stage; the first takes the stride and the channel change."""

    c: Mapping
    spec: Mapping
    first_block: int  # index of block 0 among all blocks (for the drop-connect rate)
    num_blocks: int

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.spec
        for j in range(s["repeats"]):
            rate = self.c["drop_connect_rate"] * (self.first_block + j) / self.num_blocks
            x = MBConv(self.c, s["in_ch"] if j == 0 else s["out_ch"], s["out_ch"], s["kernel"],
                       s["stride"] if j == 0 else 1, s["expand"], rate, name=str(j))(x, train)
        return x


class Blocks(nn.Module):
    """Stages ``0 .. 6`` in sequence (``blocks/<stage>/<block>``); returns every stage's output."""

    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        specs = stages(self.c)
        total, first, states = sum(s["repeats"] for s in specs), 0, []
        for s, spec in enumerate(specs):
            x = Stage(self.c, spec, first, total, name=str(s))(x, train)
            first += spec["repeats"]
            states.append(x)
        return states


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone (no classifier). ``config``: a dict (see :func:`resolve`).

    ``__call__(pixel_values, *, train=False, output_hidden_states=False)`` with
    ``pixel_values`` ``(B, C, H, W)`` -> dict, NCHW like the other CNN families:
    ``last_hidden_state`` (the head conv's output, ``(B, 1280, H/32, W/32)``),
    ``pooler_output`` (its global average, ``(B, 1280, 1, 1)``) and, when asked,
    ``hidden_states`` (the stem's then every stage's output). ``train=True`` uses
    batch statistics (``mutable=["batch_stats"]``) and drop-connect (a ``"dropout"`` rng).
    """

    config: Any

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False, output_hidden_states: bool = False):
        c = resolve(self.config)
        specs = stages(c)
        x = ConvBN(c, c["stem_features"] if c["fix_head_stem"] else specs[0]["in_ch"], 3, 2,
                   name="stem")(to_nhwc(pixel_values), train)
        states = [x, *Blocks(c, name="blocks")(x, train)]
        x = ConvBN(c, head_features(c), name="top")(states[-1], train)
        out = {"last_hidden_state": to_nchw(x), "pooler_output": to_nchw(jnp.mean(x, axis=(1, 2), keepdims=True))}
        if output_hidden_states:
            out["hidden_states"] = tuple(to_nchw(h) for h in states)
        return out


# ------------------------------------------------------------------ key map
_BLOCK = r"blocks\.(\d+)\.(\d+)"
KEY_MAP = [
    KeyRule(r"_conv_stem\.weight", "stem/conv/kernel", "conv", ndim=4),
    *batch_norm(r"_bn0", "stem/bn"),
    KeyRule(r"_conv_head\.weight", "top/conv/kernel", "conv", ndim=4),
    *batch_norm(r"_bn1", "top/bn"),
    *[rule for conv, bn, ours in (("_expand_conv", "_bn0", "expand"), ("_depthwise_conv", "_bn1", "depthwise"),
                                  ("_project_conv", "_bn2", "project"))
      for rule in (KeyRule(rf"{_BLOCK}\.{conv}\.weight", rf"blocks/\1/\2/{ours}/conv/kernel", "conv", ndim=4),
                   *batch_norm(rf"{_BLOCK}\.{bn}", rf"blocks/\1/\2/{ours}/bn"))],
]
# the checkpoint's ImageNet classifier -> our head
HEAD_MAP = (KeyRule(r"_fc\.weight", "classifier/kernel", "linear", ndim=2), KeyRule(r"_fc\.bias", "classifier/bias"))


def block_names(config: Any) -> dict[int, str]:
    """The checkpoint's flat block index -> our ``<stage>.<block>``."""
    names, i = {}, 0
    for s, spec in enumerate(stages(config)):
        for j in range(spec["repeats"]):
            names[i], i = f"{s}.{j}", i + 1
    return names


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """``efficientnet_lite_pytorch`` state dict -> ``({"params", "batch_stats"}, unused)``.

    ``_blocks.<i>.`` (flat) is renamed ``blocks.<stage>.<block>.`` from the
    variant's stage table first; a block the variant does not have stays as it
    is and comes back unused (reported as unexpected). ``_fc.*`` comes back
    unused too: the loader hands it to :data:`HEAD_MAP`.
    """
    names = block_names(config)

    def rename(key: str) -> str:
        m = re.match(r"_blocks\.(\d+)\.", key)
        if m is None or int(m.group(1)) not in names:
            return key
        return f"blocks.{names[int(m.group(1))]}." + key[m.end():]

    renamed = {rename(k): v for k, v in state_dict.items()}
    back = {rename(k): k for k in state_dict}
    flat, unused = apply_key_map(KEY_MAP, renamed)
    return flat, [back[k] for k in unused]


def dummy_inputs(config: Any) -> dict:
    return {"pixel_values": np.zeros((1, resolve(config)["num_channels"], 32, 32), np.float32)}


def build(config: Any) -> EfficientNetLite:
    resolve(config)  # an unknown variant fails here, by name
    return EfficientNetLite(config)


def feature_layers(config: Any) -> tuple[str, ...]:
    return ("stem", *(f"blocks/{s}" for s in range(len(stages(config)))), "top")


def preprocessing(config: Any) -> dict:
    """What the weights were trained on, as ``efficientnet_lite_pytorch``'s example feeds
    them: the variant's resolution, the shorter side resized to it (``crop_pct`` 1: no
    border cropped), ImageNet mean/std, bilinear."""
    return {"size": resolve(config)["image_size"], "crop_pct": 1.0, "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "resample": "bilinear"}


registry.register(registry.Family(
    model_type=MODEL_TYPE,
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"blocks/(\d+)/",
    num_layers=lambda config: len(stages(config)),
    base_model_prefix="efficientnet",
    default_pooling="pooler",
    head_map=HEAD_MAP,
    feature_layers=feature_layers,
    preprocessing=preprocessing,
))

"""VGG-11/13/16/19 (optionally with batch norm) in flax.linen; torchvision, timm and Keras weights.

The network (Simonyan & Zisserman 2015): five blocks of 3x3 convs (padding 1,
bias, ReLU; batch norm before the ReLU in the ``_bn`` variants), each followed by
a 2x2 max-pool, then -- with ``include_fc`` (the default) -- average-pooled to
7x7 (``nn.AdaptiveAvgPool2d``), flattened in torch's channel-major order and
``fc1 -> ReLU -> dropout -> fc2 -> ReLU``. The classifier itself is a head
(:class:`~jaxfer.models.heads.Classifier`), fed ``fc2``'s output.

Params (``batch_stats`` beside ``bn`` in the ``_bn`` variants)::

    blocks/<b>/<k>/conv/{kernel (3, 3, I, O), bias}    blocks/<b>/<k>/bn/{scale, bias}
    fc1/{kernel (C*7*7, 4096), bias}                    fc2/{kernel (4096, 4096), bias}

Checkpoint layouts the key map reads (``convert``):

* torchvision (``vgg16``, ``vgg19_bn`` ...): ``features.<i>`` (the Sequential's
  index, turned into ``blocks/<b>/<k>`` from the config), ``classifier.0`` (fc1),
  ``classifier.3`` (fc2), ``classifier.6`` (the ImageNet head -> ``classifier``);
* timm (``vgg16.tv_in1k`` ...): the same ``features.<i>``, ``pre_logits.fc1``/``fc2``
  as convolutions (a 7x7 and a 1x1 conv: the same maps as fc1/fc2 on a 7x7 input;
  timm slides them over larger maps where torchvision pools to 7x7 first, so the two
  agree up to 224 px and we follow torchvision), ``head.fc`` (-> ``classifier``);
* Keras applications (``.h5``): ``block<b>_conv<k>/{kernel,bias}``, ``fc1``, ``fc2``
  (flattened row-major over 7x7xC, permuted here), ``predictions`` (-> ``classifier``).
  Keras's VGG weights take BGR input with the ImageNet mean subtracted on a 0-255
  scale ("caffe"): the first conv's input channels are reversed at load time, so
  inputs stay RGB, and ``config["normalization"] = "caffe"`` gives the matching
  preprocessing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.models.common import adaptive_avg_pool, config_dict, to_nchw, to_nhwc, torch_batch_norm, torch_conv, \
    torch_max_pool
from jaxfer.models.keymap import KeyRule, apply_key_map, batch_norm

# output channels of each conv, per block (torchvision's cfgs "A", "B", "D", "E")
WIDTHS = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
POOL = 7  # the 7x7 grid fc1 reads
DEFAULTS = dict(depth=16, batch_norm=False, widths=None, num_channels=3, fc_features=(4096, 4096),
                include_fc=True, dropout_rate=0.5, normalization="imagenet")


def resolve(config: Any) -> dict:
    """Config -> all fields; ``widths`` (per-block conv channels) default to ``depth``'s."""
    c = config_dict(config, DEFAULTS)
    if c["widths"] is None:
        if c["depth"] not in WIDTHS:
            raise ValueError(f"VGG depth {c['depth']!r}; choose one of {sorted(WIDTHS)} (or give widths)")
        c["widths"] = WIDTHS[c["depth"]]
    c["widths"] = tuple(tuple(int(w) for w in block) for block in c["widths"])
    c["fc_features"] = tuple(int(f) for f in c["fc_features"])
    if c["normalization"] not in ("imagenet", "caffe"):
        raise ValueError(f"VGG normalization {c['normalization']!r}; choose 'imagenet' or 'caffe'")
    return c


class ConvUnit(nn.Module):
    """3x3 conv (padding 1, bias) -> [batch norm] -> ReLU."""

    features: int
    bn: bool

    @nn.compact
    def __call__(self, x, train: bool):
        x = torch_conv(self.features, 3, 1, padding=1, use_bias=True, name="conv")(x)
        if self.bn:
            x = torch_batch_norm(train, "bn")(x)
        return nn.relu(x)


class Block(nn.Module):
    """``len(widths)`` x (3x3 conv, [batch norm], ReLU); returns the map before the max-pool."""

    widths: tuple[int, ...]
    bn: bool

    @nn.compact
    def __call__(self, x, train: bool):
        for k, w in enumerate(self.widths):
            x = ConvUnit(w, self.bn, name=str(k))(x, train)
        return x


class Blocks(nn.Module):
    c: Mapping

    @nn.compact
    def __call__(self, x, train: bool):
        states = []
        for b, widths in enumerate(self.c["widths"]):
            x = Block(widths, self.c["batch_norm"], name=str(b))(x, train)
            states.append(x)
            x = torch_max_pool(x, 2, 2)
        return states, x


class VGG(nn.Module):
    """VGG backbone. ``__call__(pixel_values, *, train=False, output_hidden_states=False)`` with
    ``pixel_values`` ``(B, C, H, W)`` -> dict: ``last_hidden_state`` (the last max-pool's
    map, NCHW), ``pooler_output`` (``fc2``'s output ``(B, 4096)`` with ``include_fc``, else
    the map's global average ``(B, C, 1, 1)``) and, when asked, ``hidden_states`` (each
    block's map before its max-pool: timm's ``features_only`` taps)."""

    config: Any

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False, output_hidden_states: bool = False):
        c = resolve(self.config)
        states, x = Blocks(c, name="blocks")(to_nhwc(pixel_values), train)
        out = {"last_hidden_state": to_nchw(x)}
        if c["include_fc"]:
            y = to_nchw(adaptive_avg_pool(x, POOL)).reshape(x.shape[0], -1)  # torch's flatten order
            for i, f in enumerate(c["fc_features"]):
                y = nn.relu(nn.Dense(f, name=f"fc{i + 1}")(y))
                if i == 0:
                    y = nn.Dropout(c["dropout_rate"])(y, deterministic=not train)
            out["pooler_output"] = y
        else:
            out["pooler_output"] = to_nchw(jnp.mean(x, axis=(1, 2), keepdims=True))
        if output_hidden_states:
            out["hidden_states"] = tuple(to_nchw(s) for s in states)
        return out


# ------------------------------------------------------------------ key map
def _conv_as_linear(w: np.ndarray) -> np.ndarray:
    """timm's ``pre_logits`` conv ``(O, I, kh, kw)`` -> Dense kernel ``(I*kh*kw, O)`` (torch's flatten order)."""
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _keras_flatten(k: np.ndarray) -> np.ndarray:
    """Keras ``fc1`` kernel, rows in ``(h, w, c)`` order over 7x7xC -> rows in ``(c, h, w)`` order."""
    c = k.shape[0] // (POOL * POOL)
    return np.ascontiguousarray(k.reshape(POOL, POOL, c, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1))


def _bgr_to_rgb(k: np.ndarray) -> np.ndarray:
    """Keras VGG's first kernel ``(3, 3, 3, O)`` reads BGR; reversed, it reads RGB."""
    return np.ascontiguousarray(k[:, :, ::-1, :])


_UNIT = r"blocks\.(\d+)\.(\d+)"
KEY_MAP = [
    KeyRule(_UNIT + r"\.conv\.weight", r"blocks/\1/\2/conv/kernel", "conv", ndim=4),
    KeyRule(_UNIT + r"\.conv\.bias", r"blocks/\1/\2/conv/bias"),
    *batch_norm(_UNIT + r"\.bn", r"blocks/\1/\2/bn"),
    # torchvision
    KeyRule(r"classifier\.0\.weight", "fc1/kernel", "linear", ndim=2),
    KeyRule(r"classifier\.0\.bias", "fc1/bias"),
    KeyRule(r"classifier\.3\.weight", "fc2/kernel", "linear", ndim=2),
    KeyRule(r"classifier\.3\.bias", "fc2/bias"),
    # timm
    KeyRule(r"pre_logits\.(fc[12])\.weight", r"\1/kernel", _conv_as_linear, ndim=4),
    KeyRule(r"pre_logits\.(fc[12])\.bias", r"\1/bias"),
    # Keras (after convert's renaming of block<b>_conv<k>)
    KeyRule(r"keras\.0\.0\.conv\.kernel", "blocks/0/0/conv/kernel", _bgr_to_rgb),
    KeyRule(r"keras\.(\d+)\.(\d+)\.conv\.(kernel|bias)", r"blocks/\1/\2/conv/\3"),
    KeyRule(r"fc1/kernel", "fc1/kernel", _keras_flatten, ndim=2),
    KeyRule(r"(fc[12])/(kernel|bias)", r"\1/\2"),
]
HEAD_MAP = (
    KeyRule(r"classifier\.6\.weight", "classifier/kernel", "linear", ndim=2),
    KeyRule(r"classifier\.6\.bias", "classifier/bias"),
    KeyRule(r"head\.fc\.weight", "classifier/kernel", "linear", ndim=2),
    KeyRule(r"head\.fc\.bias", "classifier/bias"),
    KeyRule(r"predictions/kernel", "classifier/kernel"),
    KeyRule(r"predictions/bias", "classifier/bias"),
)


def feature_names(config: Any) -> dict[int, str]:
    """torch ``features.<i>`` index -> ``blocks.<b>.<k>.conv`` / ``.bn`` (ReLU and pool indices absent)."""
    c = resolve(config)
    names, i = {}, 0
    for b, widths in enumerate(c["widths"]):
        for k in range(len(widths)):
            names[i] = f"blocks.{b}.{k}.conv"
            if c["batch_norm"]:
                names[i + 1] = f"blocks.{b}.{k}.bn"
            i += 3 if c["batch_norm"] else 2
        i += 1  # max-pool
    return names


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """torchvision / timm / Keras VGG weights -> ``({"params"[, "batch_stats"]}, unused)``.

    The ImageNet classifier (``classifier.6``, ``head.fc``, ``predictions``) comes
    back unused; the loader hands it to :data:`HEAD_MAP`.
    """
    names = feature_names(config)

    def rename(key: str) -> str:
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m and int(m.group(1)) in names:
            return f"{names[int(m.group(1))]}.{m.group(2)}"
        m = re.fullmatch(r"block(\d+)_conv(\d+)/(kernel|bias)", key)
        if m:
            return f"keras.{int(m.group(1)) - 1}.{int(m.group(2)) - 1}.conv.{m.group(3)}"
        return key

    back = {rename(k): k for k in state_dict}
    flat, unused = apply_key_map(KEY_MAP, {rename(k): v for k, v in state_dict.items()})
    return flat, [back[k] for k in unused]


def dummy_inputs(config: Any) -> dict:
    return {"pixel_values": np.zeros((1, resolve(config)["num_channels"], 32, 32), np.float32)}


def build(config: Any) -> VGG:
    resolve(config)  # bad depth / normalization fail here, by name
    return VGG(config)


def preprocessing(config: Any) -> dict:
    """torchvision's ImageNet transform (shorter side 256, centre crop 224, ImageNet mean/std);
    ``normalization="caffe"`` (Keras weights): mean-subtracted 0-255 values (RGB here: the
    first conv was flipped from BGR at load time)."""
    if resolve(config)["normalization"] == "caffe":
        return {"size": 224, "crop_pct": 0.875, "mean": (123.68 / 255, 116.779 / 255, 103.939 / 255),
                "std": (1 / 255,) * 3, "resample": "bilinear"}
    return {"size": 224, "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "resample": "bilinear"}


registry.register(registry.Family(
    model_type="vgg",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=r"blocks/(\d+)/",
    num_layers=lambda config: len(resolve(config)["widths"]),
    base_model_prefix="vgg",
    default_pooling="pooler",
    head_map=HEAD_MAP,
    feature_layers=lambda config: tuple(f"blocks/{b}" for b in range(len(resolve(config)["widths"]))),
    preprocessing=preprocessing,
))

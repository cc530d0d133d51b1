"""Inception-v3 in flax.linen; torchvision, timm and Keras weights.

The network (Szegedy et al. 2016) as torchvision's ``Inception3`` builds it: a
stem of five conv units and two max-pools, then eleven mixed blocks -- three
``A`` (35x35), one ``B`` (grid reduction), four ``C`` (17x17, factorised 7x7),
one ``D`` (reduction), two ``E`` (8x8, split 1x3 / 3x1 branches) -- whose
branches are concatenated along channels, and a global average pool. A conv
unit is conv (no bias) -> batch norm (``eps=1e-3``) -> ReLU. The architecture
is one table (:data:`STEM`, :func:`blocks`), read by the module and the key map
alike, so the units' order is the order in which Keras creates its layers.

Params, named as torchvision names its modules (``batch_stats`` beside ``bn``)::

    Conv2d_1a_3x3/conv/kernel (3, 3, 3, 32)      Conv2d_1a_3x3/bn/{scale,bias}
    Mixed_5b/branch5x5_1/conv/kernel ...         Mixed_7c/branch3x3dbl_3b/bn/...

Checkpoint layouts:

* torchvision / timm (``inception_v3``): the same names with dots; ``fc`` (the
  ImageNet classifier) loads into a ``Classifier`` head, ``AuxLogits.*`` (the
  training-time auxiliary classifier) is reported as another head's and dropped.
  torchvision's ImageNet weights expect ``config["transform_input"] = True``
  (ImageNet-normalised input re-scaled to ``[-1, 1]`` inside, as torchvision does);
* Keras applications (``.h5``, ``config["layout"] = "keras"``): ``conv2d_<n>`` and
  ``batch_normalization_<n>`` in creation order (any numbering offset), batch norm
  without a scale (``scale=False``), the branches' 3x3 average pools not counting
  their padding (TF ``"same"``), inputs scaled to ``[-1, 1]``; ``predictions`` is the head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfer.models import registry
from jaxfer.models.common import BN_MOMENTUM, config_dict, pair, to_nchw, to_nhwc, torch_avg_pool, torch_conv, \
    torch_max_pool
from jaxfer.models.keymap import KeyRule, apply_key_map, batch_norm

DEFAULTS = dict(num_channels=3, layout="torch", transform_input=False, dropout_rate=0.5)
LAYOUTS = ("torch", "keras")


def U(name: str, features: int, kernel, stride: int = 1, padding=0) -> tuple:
    """A conv unit: ``(name, features, (kh, kw), stride, (ph, pw))``."""
    return (name, features, pair(kernel), stride, pair(padding))


STEM = (U("Conv2d_1a_3x3", 32, 3, 2), U("Conv2d_2a_3x3", 32, 3), U("Conv2d_2b_3x3", 64, 3, padding=1), "max",
        U("Conv2d_3b_1x1", 80, 1), U("Conv2d_4a_3x3", 192, 3), "max")


def _a(pool_features):
    return ([U("branch1x1", 64, 1)],
            [U("branch5x5_1", 48, 1), U("branch5x5_2", 64, 5, padding=2)],
            [U("branch3x3dbl_1", 64, 1), U("branch3x3dbl_2", 96, 3, padding=1), U("branch3x3dbl_3", 96, 3, padding=1)],
            ["avg", U("branch_pool", pool_features, 1)])


_B = ([U("branch3x3", 384, 3, 2)],
      [U("branch3x3dbl_1", 64, 1), U("branch3x3dbl_2", 96, 3, padding=1), U("branch3x3dbl_3", 96, 3, 2)],
      ["max"])


def _c(c7):
    return ([U("branch1x1", 192, 1)],
            [U("branch7x7_1", c7, 1), U("branch7x7_2", c7, (1, 7), padding=(0, 3)),
             U("branch7x7_3", 192, (7, 1), padding=(3, 0))],
            [U("branch7x7dbl_1", c7, 1), U("branch7x7dbl_2", c7, (7, 1), padding=(3, 0)),
             U("branch7x7dbl_3", c7, (1, 7), padding=(0, 3)), U("branch7x7dbl_4", c7, (7, 1), padding=(3, 0)),
             U("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))],
            ["avg", U("branch_pool", 192, 1)])


_D = ([U("branch3x3_1", 192, 1), U("branch3x3_2", 320, 3, 2)],
      [U("branch7x7x3_1", 192, 1), U("branch7x7x3_2", 192, (1, 7), padding=(0, 3)),
       U("branch7x7x3_3", 192, (7, 1), padding=(3, 0)), U("branch7x7x3_4", 192, 3, 2)],
      ["max"])
_E = ([U("branch1x1", 320, 1)],
      [U("branch3x3_1", 384, 1), ("split", U("branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                                  U("branch3x3_2b", 384, (3, 1), padding=(1, 0)))],
      [U("branch3x3dbl_1", 448, 1), U("branch3x3dbl_2", 384, 3, padding=1),
       ("split", U("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)), U("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)))],
      ["avg", U("branch_pool", 192, 1)])


def blocks() -> tuple[tuple[str, tuple], ...]:
    """The mixed blocks in order: ``(name, branches)``; a branch is a list of steps
    (a unit, ``"avg"``/``"max"`` pooling, or ``("split", unit, unit)``: both on the same
    input, concatenated)."""
    return (("Mixed_5b", _a(32)), ("Mixed_5c", _a(64)), ("Mixed_5d", _a(64)), ("Mixed_6a", _B),
            ("Mixed_6b", _c(128)), ("Mixed_6c", _c(160)), ("Mixed_6d", _c(160)), ("Mixed_6e", _c(192)),
            ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E))


def resolve(config: Any) -> dict:
    c = config_dict(config, DEFAULTS)
    if c["layout"] not in LAYOUTS:
        raise ValueError(f"Inception-v3 layout {c['layout']!r}; choose one of {LAYOUTS}")
    return c


def unit_paths() -> list[str]:
    """Every conv unit's path, in the order the network creates (and Keras numbers) them."""
    paths = [u[0] for u in STEM if isinstance(u, tuple)]
    for block, branches in blocks():
        for branch in branches:
            for step in branch:
                if isinstance(step, tuple) and step[0] == "split":
                    paths += [f"{block}/{step[1][0]}", f"{block}/{step[2][0]}"]
                elif isinstance(step, tuple):
                    paths.append(f"{block}/{step[0]}")
    return paths


# ------------------------------------------------------------------ modules
class ConvUnit(nn.Module):
    """Conv (no bias, torch padding) -> batch norm (eps 1e-3; no scale in the Keras layout) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int
    padding: tuple[int, int]
    scale: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        x = torch_conv(self.features, self.kernel, self.stride, padding=self.padding, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-3, use_scale=self.scale,
                         name="bn")(x)
        return nn.relu(x)


def _unit(spec, c, name=None):
    n, f, k, s, p = spec
    return ConvUnit(f, k, s, p, scale=c["layout"] == "torch", name=name or n)


def _pool(kind: str, x, c):
    if kind == "max":
        return torch_max_pool(x, 3, 2)
    return torch_avg_pool(x, 3, 1, 1, count_include_pad=c["layout"] == "torch")


class Mixed(nn.Module):
    """One mixed block: its branches side by side, concatenated along channels."""

    c: Mapping
    branches: tuple

    @nn.compact
    def __call__(self, x, train: bool):
        outs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, str):
                    y = _pool(step, y, self.c)
                elif step[0] == "split":
                    y = jnp.concatenate([_unit(step[1], self.c)(y, train), _unit(step[2], self.c)(y, train)], -1)
                else:
                    y = _unit(step, self.c)(y, train)
            outs.append(y)
        return jnp.concatenate(outs, -1)


class InceptionV3(nn.Module):
    """Inception-v3 backbone. ``__call__(pixel_values, *, train=False, output_hidden_states=False)``
    with ``pixel_values`` ``(B, C, H, W)`` (at least 75x75) -> dict: ``last_hidden_state``
    (``Mixed_7c``'s map, NCHW), ``pooler_output`` (its global average, ``(B, 2048, 1, 1)``)
    and, when asked, ``hidden_states`` (the stem's then every mixed block's output)."""

    config: Any

    @nn.compact
    def __call__(self, pixel_values, *, train: bool = False, output_hidden_states: bool = False):
        c = resolve(self.config)
        x = to_nhwc(pixel_values)
        if c["transform_input"]:  # ImageNet-normalised -> (x - 0.5) / 0.5, per channel
            mean, std = jnp.asarray((0.485, 0.456, 0.406)), jnp.asarray((0.229, 0.224, 0.225))
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        for step in STEM:
            x = _pool(step, x, c) if isinstance(step, str) else _unit(step, c)(x, train)
        states = [x]
        for name, branches in blocks():
            x = Mixed(c, branches, name=name)(x, train)
            states.append(x)
        out = {"last_hidden_state": to_nchw(x), "pooler_output": to_nchw(jnp.mean(x, axis=(1, 2), keepdims=True))}
        if output_hidden_states:
            out["hidden_states"] = tuple(to_nchw(s) for s in states)
        return out


# ------------------------------------------------------------------ key map
_UNIT = r"(?!AuxLogits\.)(.+)"  # AuxLogits.* stays unused: the loader's HEAD_MAP reports it
KEY_MAP = [
    KeyRule(_UNIT + r"\.conv\.weight", r"\1/conv/kernel", "conv", ndim=4),
    *batch_norm(_UNIT + r"\.bn", r"\1/bn"),
    # Keras, after convert's renaming of conv2d_<n> / batch_normalization_<n>
    KeyRule(r"(.+)\.conv\.kernel", r"\1/conv/kernel", ndim=4),
    KeyRule(r"(.+)\.bn\.gamma", r"\1/bn/scale"),
    KeyRule(r"(.+)\.bn\.beta", r"\1/bn/bias"),
    KeyRule(r"(.+)\.bn\.moving_mean", r"\1/bn/mean", collection="batch_stats"),
    KeyRule(r"(.+)\.bn\.moving_variance", r"\1/bn/var", collection="batch_stats"),
]
HEAD_MAP = (
    KeyRule(r"fc\.weight", "classifier/kernel", "linear", ndim=2),
    KeyRule(r"fc\.bias", "classifier/bias"),
    KeyRule(r"predictions/kernel", "classifier/kernel"),
    KeyRule(r"predictions/bias", "classifier/bias"),
    KeyRule(r"AuxLogits\.(.+)", r"AuxLogits/\1"),  # another head: reported, dropped
)


def _keras_index(name: str) -> int:
    """``conv2d`` -> 0, ``conv2d_12`` -> 12 (Keras numbers repeated layer names in creation order)."""
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else 0


def _keras_names(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Keras layer name -> ``<unit path>.conv`` / ``.bn``, matching creation order to :func:`unit_paths`."""
    layers = list(dict.fromkeys(k.split("/")[0] for k in state_dict if "/" in k))
    paths, out = unit_paths(), {}
    for kind, ours in (("conv2d", "conv"), ("batch_normalization", "bn")):
        found = sorted((n for n in layers if re.fullmatch(kind + r"(_\d+)?", n)), key=_keras_index)
        if len(found) == len(paths):
            out.update({n: f"{p.replace('/', '.')}.{ours}" for n, p in zip(found, paths)})
    return out


def convert(state_dict: Mapping[str, np.ndarray], config: Any) -> tuple[registry.FlatVariables, list[str]]:
    """torchvision / timm / Keras Inception-v3 weights -> ``({"params", "batch_stats"}, unused)``.

    Keras layers are matched to units by creation order (94 convs and 94 batch
    norms); a file with another count keeps its names and comes back unused. The
    classifier and ``AuxLogits`` come back unused for the loader's :data:`HEAD_MAP`.
    """
    names = _keras_names(state_dict)

    def rename(key: str) -> str:
        layer, _, weight = key.partition("/")
        return f"{names[layer]}.{weight}" if weight and layer in names else key

    back = {rename(k): k for k in state_dict}
    flat, unused = apply_key_map(KEY_MAP, {rename(k): v for k, v in state_dict.items()})
    return flat, [back[k] for k in unused]


_MIXED = {name: i for i, (name, _) in enumerate(blocks())}


def layer_index(path: str) -> int | None:
    """``Mixed_5b/...`` -> 0 ... ``Mixed_7c/...`` -> 10 (the stem: ``None``), for layer masks and decay."""
    m = re.search(r"(Mixed_\d[a-e])/", path)
    return _MIXED[m.group(1)] if m else None


def dummy_inputs(config: Any) -> dict:
    return {"pixel_values": np.zeros((1, resolve(config)["num_channels"], 75, 75), np.float32)}


def build(config: Any) -> InceptionV3:
    resolve(config)
    return InceptionV3(config)


def preprocessing(config: Any) -> dict:
    """torchvision's (shorter side 342, centre crop 299, ImageNet mean/std -- with
    ``transform_input`` the model re-scales inside) or Keras's (same crop, ``[-1, 1]``)."""
    if resolve(config)["layout"] == "keras":
        return {"size": 299, "crop_pct": 299 / 342, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resample": "bilinear"}
    return {"size": 299, "crop_pct": 299 / 342, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "resample": "bilinear"}


registry.register(registry.Family(
    model_type="inception_v3",
    build=build,
    convert=convert,
    dummy_inputs=dummy_inputs,
    layer_pattern=layer_index,
    num_layers=lambda config: len(blocks()),
    base_model_prefix="inception",
    default_pooling="pooler",
    head_map=HEAD_MAP,
    feature_layers=lambda config: ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"),
    preprocessing=preprocessing,
))

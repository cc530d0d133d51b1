"""Declarative key maps: checkpoint (PyTorch/safetensors) names -> our param paths.

A model family describes its checkpoint layout as a list of :class:`KeyRule`\\ s
(its ``KEY_MAP``, kept in the family's own file)::

    KEY_MAP = [
        KeyRule(r"embeddings\\.word_embeddings\\.weight", "embeddings/word_embeddings/embedding", "embedding"),
        KeyRule(r"(.*)\\.LayerNorm\\.(?:weight|gamma)", r"\\1/LayerNorm/scale", "norm_scale"),
        KeyRule(r"(.*)\\.weight", r"\\1/kernel", "linear", ndim=2),
        KeyRule(r"(.*)\\.bias", r"\\1/bias"),
        KeyRule(r".*\\.position_ids", None),                   # a buffer: consumed, dropped
        *batch_norm(r"(.*)\\.normalization", r"\\1/normalization"),
    ]
    variables, unused = apply_key_map(RULES, state_dict)
    # variables == {"params": {"embeddings/word_embeddings/embedding": array, ...},
    #               "batch_stats": {".../normalization/mean": array, ...}}

How a rule applies to one checkpoint key:

* ``src`` is a regex matched against the *whole* key (``re.fullmatch``); the
  first matching rule wins, so put specific rules before generic ones. A rule
  with ``ndim`` only matches arrays of that rank (``weight`` of a ``Linear`` is
  2-D, of a ``Conv2d`` 4-D, of a norm 1-D).
* ``dst`` is an ``re`` replacement template (``\\1``, ``\\g<name>``); after
  substitution every ``.`` becomes ``/``, so ``\\1`` may carry a dotted torch
  prefix (``encoder.layer.3.attention``) straight into our path language.
  ``dst=None`` consumes the key and drops it (buffers such as ``position_ids``,
  ``num_batches_tracked``).
* ``transform`` maps the array: a name from :data:`TRANSFORMS` (``"identity"``,
  ``"linear"``, ``"conv"``, ``"embedding"``, ``"norm_scale"``), a :class:`Transform`
  or any callable ``np.ndarray -> np.ndarray``. A named transform (or a
  :class:`Transform`) carries its inverse, ``rule.inverse(rule.fn(x)) == x``,
  the way back to the checkpoint layout (saving; a bare callable has none).
* ``collection`` routes the result (``"params"`` by default; BN running
  statistics go to ``"batch_stats"``, see :func:`batch_norm`).

Keys no rule matches come back in ``unused`` (the loader reports them as
unexpected); two keys that land on the same path are an error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# A converted checkpoint: {collection: {our/path: array}}, e.g.
# {"params": {"embeddings/word_embeddings/embedding": ...}, "batch_stats": {...}}
FlatVariables = dict[str, dict[str, np.ndarray]]


# ---------------------------------------------------------------- transforms
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    """``nn.Linear.weight`` ``(out, in)`` -> ``nn.Dense`` kernel ``(in, out)``."""
    if x.ndim != 2:
        raise ValueError(f"'linear' expects a 2-D weight, got shape {x.shape}")
    return np.ascontiguousarray(x.T)


def linear_inverse(x: np.ndarray) -> np.ndarray:
    """``nn.Dense`` kernel ``(in, out)`` -> ``nn.Linear.weight`` ``(out, in)``."""
    if x.ndim != 2:
        raise ValueError(f"'linear' inverse expects a 2-D kernel, got shape {x.shape}")
    return np.ascontiguousarray(x.T)


def conv(x: np.ndarray) -> np.ndarray:
    """``nn.ConvNd.weight`` ``(O, I, *spatial)`` -> ``nn.Conv`` kernel ``(*spatial, I, O)``."""
    if x.ndim < 3:
        raise ValueError(f"'conv' expects a weight of rank >= 3, got shape {x.shape}")
    return np.ascontiguousarray(np.transpose(x, tuple(range(2, x.ndim)) + (1, 0)))


def conv_inverse(x: np.ndarray) -> np.ndarray:
    """``nn.Conv`` kernel ``(*spatial, I, O)`` -> ``nn.ConvNd.weight`` ``(O, I, *spatial)``."""
    if x.ndim < 3:
        raise ValueError(f"'conv' inverse expects a kernel of rank >= 3, got shape {x.shape}")
    return np.ascontiguousarray(np.transpose(x, (x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2))))


@dataclasses.dataclass(frozen=True)
class Transform:
    """An array transform checkpoint -> ours (``fn``) and its way back (``inverse``):
    ``inverse(fn(x)) == x`` for every array ``fn`` accepts."""

    fn: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(identity, identity),
    "linear": Transform(linear, linear_inverse),
    "conv": Transform(conv, conv_inverse),
    "embedding": Transform(identity, identity),  # (vocab, features) in both frameworks
    "norm_scale": Transform(identity, identity),  # LayerNorm/BatchNorm weight -> scale
}


# --------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One line of a key map; see the module docstring."""

    src: str
    dst: str | None
    transform: str | Transform | Callable[[np.ndarray], np.ndarray] = "identity"
    collection: str = "params"
    ndim: int | None = None

    def __post_init__(self):
        if isinstance(self.transform, str) and self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {sorted(TRANSFORMS)}")

    @property
    def fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """Checkpoint array -> ours."""
        return TRANSFORMS[self.transform] if isinstance(self.transform, str) else self.transform

    @property
    def inverse(self) -> Callable[[np.ndarray], np.ndarray]:
        """Our array -> the checkpoint's; an error for a bare callable transform."""
        t = self.fn
        if not isinstance(t, Transform):
            raise ValueError(f"key rule {self.src!r}: transform {t!r} has no inverse; "
                             "give a Transform(fn, inverse) or a name from TRANSFORMS")
        return t.inverse


KeyRuleLike = KeyRule | Sequence[Any]


def as_key_rule(rule: KeyRuleLike) -> KeyRule:
    """A :class:`KeyRule` or a tuple ``(src, dst[, transform[, collection[, ndim]]])``."""
    return rule if isinstance(rule, KeyRule) else KeyRule(*rule)


def batch_norm(src: str, dst: str) -> list[KeyRule]:
    """Rules for a ``BatchNorm`` at torch prefix regex ``src`` -> our prefix ``dst``.

    ``weight``/``bias`` -> ``params/{scale,bias}``, ``running_mean``/``running_var``
    -> ``batch_stats/{mean,var}``, ``num_batches_tracked`` dropped.
    """
    return [
        KeyRule(src + r"\.weight", dst + "/scale", "norm_scale", ndim=1),
        KeyRule(src + r"\.bias", dst + "/bias", ndim=1),
        KeyRule(src + r"\.running_mean", dst + "/mean", collection="batch_stats"),
        KeyRule(src + r"\.running_var", dst + "/var", collection="batch_stats"),
        KeyRule(src + r"\.num_batches_tracked", None),
    ]


def generic_rules() -> list[KeyRule]:
    """Layout-agnostic rules for plain ``Linear``/``Conv``/norm stacks (e.g. task heads).

    ``weight`` by rank: 2-D -> ``kernel`` (transposed), >=3-D -> conv ``kernel``,
    1-D -> ``scale``; ``bias`` -> ``bias``; BN running stats -> ``batch_stats``.
    """
    return [
        KeyRule(r"(.*)\.weight", r"\1/kernel", "linear", ndim=2),
        KeyRule(r"(.*)\.weight", r"\1/kernel", "conv", ndim=4),
        KeyRule(r"(.*)\.weight", r"\1/kernel", "conv", ndim=3),
        KeyRule(r"(.*)\.weight", r"\1/scale", "norm_scale", ndim=1),
        KeyRule(r"(.*)\.bias", r"\1/bias"),
        KeyRule(r"(.*)\.running_mean", r"\1/mean", collection="batch_stats"),
        KeyRule(r"(.*)\.running_var", r"\1/var", collection="batch_stats"),
        KeyRule(r"(.*)\.num_batches_tracked", None),
    ]


# -------------------------------------------------------------------- engine
def apply_key_map(
    rules: Iterable[KeyRuleLike], state_dict: Mapping[str, Any]
) -> tuple[FlatVariables, list[str]]:
    """Convert ``state_dict`` (``{torch name: array}``) with ``rules``.

    Returns ``(variables, unused_keys)``: ``variables`` is ``{collection: {our/path:
    np.ndarray}}`` (``"params"`` always present), ``unused_keys`` the checkpoint
    keys no rule matched, in checkpoint order.
    """
    compiled = [(re.compile(r.src), r) for r in map(as_key_rule, rules)]
    out: FlatVariables = {"params": {}}
    origin: dict[tuple[str, str], str] = {}
    unused: list[str] = []
    for key, value in state_dict.items():
        arr = np.asarray(value)
        for rx, rule in compiled:
            m = rx.fullmatch(key)
            if m is None or (rule.ndim is not None and arr.ndim != rule.ndim):
                continue
            if rule.dst is not None:
                path = m.expand(rule.dst).replace(".", "/")
                slot = (rule.collection, path)
                if slot in origin:
                    raise ValueError(
                        f"key map sends both {origin[slot]!r} and {key!r} to {rule.collection}:{path}"
                    )
                origin[slot] = key
                out.setdefault(rule.collection, {})[path] = rule.fn(arr)
            break
        else:
            unused.append(key)
    return out, unused


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a task checkpoint into ``(backbone keys with 'prefix.' removed, other keys)``.

    A checkpoint saved from the bare backbone (no key starts with ``prefix.``) is
    returned whole as the backbone part.
    """
    if not prefix:
        return dict(state_dict), {}
    dotted = prefix + "."
    if not any(k.startswith(dotted) for k in state_dict):
        return dict(state_dict), {}
    inner = {k[len(dotted):]: v for k, v in state_dict.items() if k.startswith(dotted)}
    rest = {k: v for k, v in state_dict.items() if not k.startswith(dotted)}
    return inner, rest

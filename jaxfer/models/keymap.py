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


# ------------------------------------------------------------------- inverse
# Each rule is inverted from its own text: ``src`` (a torch-key regex) becomes a
# template and ``dst`` (our path template) a regex. E.g.
#   KeyRule(r"(.*)\.LayerNorm\.(?:weight|gamma)", r"\1/LayerNorm/scale")
#   inverse: our path r"(?P<g1>.*)/LayerNorm/scale"  ->  torch key "{g1}.LayerNorm.weight"
# Outside capturing groups ``src`` may hold literals, escaped literals and
# non-capturing alternations (the first alternative is written back); a group
# value's ``/`` becomes ``.`` again. Rules outside that subset have no inverse.
class NotInvertible(ValueError):
    """A key rule whose ``src``/``dst`` cannot be turned around (see :func:`invert_rule`)."""


def _closing(s: str, i: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``s[i]`` (escapes and classes skipped)."""
    depth, j, in_class = 0, i, False
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise NotInvertible(f"unbalanced parentheses in {s!r}")


def _alternatives(body: str) -> list[str]:
    """Top-level ``|`` split of a group body."""
    out, depth, start, j = [], 0, 0, 0
    while j < len(body):
        c = body[j]
        if c == "\\":
            j += 2
            continue
        depth += c == "("
        depth -= c == ")"
        if c == "|" and depth == 0:
            out.append(body[start:j])
            start = j + 1
        j += 1
    return out + [body[start:]]


def _src_template(src: str) -> tuple[list[str | int], dict[int, str]]:
    """``src`` regex -> (template parts: literal strings and group numbers, {group: body})."""
    parts: list[str | int] = []
    groups: dict[int, str] = {}
    i = 0
    while i < len(src):
        c = src[i]
        if c == "\\":
            nxt = src[i + 1: i + 2]
            if not nxt or nxt.isalnum():
                raise NotInvertible(f"{src!r}: {c}{nxt} outside a capturing group")
            parts.append(nxt)
            i += 2
        elif c == "(":
            j = _closing(src, i)
            body = src[i + 1: j]
            if body.startswith("?:"):
                sub, inner = _src_template(_alternatives(body[2:])[0])
                if inner:
                    raise NotInvertible(f"{src!r}: a capturing group inside (?:...)")
                parts += sub
            elif body.startswith("?"):
                raise NotInvertible(f"{src!r}: group {body[:3]!r}")
            else:
                if "(" in body.replace("(?:", ""):
                    raise NotInvertible(f"{src!r}: nested capturing groups")
                n = len(groups) + 1
                groups[n] = body
                parts.append(n)
            i = j + 1
        elif c in ".*+?[]{}|^$":
            raise NotInvertible(f"{src!r}: {c!r} outside a capturing group")
        else:
            parts.append(c)
            i += 1
    return parts, groups


_DST_REF = re.compile(r"\\(\d+)|\\g<(\d+)>")


def invert_rule(rule: KeyRuleLike) -> tuple[re.Pattern, list[str | int]] | None:
    """``(regex over our paths, torch-key template parts)`` of a rule; ``None`` for a
    dropping rule (``dst=None``). Raises :class:`NotInvertible` when it has no inverse."""
    rule = as_key_rule(rule)
    if rule.dst is None:
        return None
    parts, groups = _src_template(rule.src)
    regex, seen, pos = [], set(), 0
    for m in _DST_REF.finditer(rule.dst):
        regex.append(re.escape(rule.dst[pos:m.start()].replace(".", "/")))
        n = int(m.group(1) or m.group(2))
        if n not in groups:
            raise NotInvertible(f"{rule.dst!r} refers to group {n}, which {rule.src!r} does not capture")
        body = groups[n].replace(r"\.", "/")
        regex.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>{body})")
        seen.add(n)
        pos = m.end()
    regex.append(re.escape(rule.dst[pos:].replace(".", "/")))
    unused = set(groups) - seen
    if unused:
        raise NotInvertible(f"{rule.src!r}: group(s) {sorted(unused)} are not written to {rule.dst!r}")
    return re.compile("".join(regex)), parts


def invert_key_map(rules: Iterable[KeyRuleLike], variables: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Our flat variables (``{collection: {path: array}}``) -> ``({torch key: array}, unmatched)``.

    Each leaf goes through the first rule (in the key map's order) of its
    collection whose inverse matches its path and rank, and that rule's inverse
    transform. ``unmatched`` lists ``"collection:path"`` of leaves no rule takes
    back. The result is checked: :func:`apply_key_map` of it gives ``variables``
    back bit for bit, or this raises naming the first difference.
    """
    rules = [as_key_rule(r) for r in rules]
    inverses = []
    for r in rules:
        try:
            inverses.append(invert_rule(r))
        except NotInvertible:
            inverses.append(None)
    out: dict[str, np.ndarray] = {}
    unmatched: list[str] = []
    for collection, leaves in variables.items():
        for path, value in leaves.items():
            arr = np.asarray(value)
            for rule, inv in zip(rules, inverses):
                if inv is None or rule.collection != collection or (rule.ndim is not None and arr.ndim != rule.ndim):
                    continue
                m = inv[0].fullmatch(path)
                if m is None:
                    continue
                key = "".join(p if isinstance(p, str) else m.group(f"g{p}").replace("/", ".") for p in inv[1])
                if key in out:
                    raise ValueError(f"two leaves go back to the checkpoint key {key!r}")
                out[key] = rule.inverse(arr)
                break
            else:
                unmatched.append(f"{collection}:{path}")
    back, unused = apply_key_map(rules, out)
    taken = {c: {p: v for p, v in vs.items() if f"{c}:{p}" not in unmatched} for c, vs in variables.items()}
    for c in set(back) | set(taken):
        got, want = back.get(c, {}), taken.get(c, {})
        if got.keys() != want.keys() or unused:
            diff = sorted(set(got) ^ set(want))[:3]
            raise ValueError(f"the key map does not invert: {c} paths {diff} (unused {unused[:3]}) "
                             "differ after saving and converting back")
        for p, v in want.items():
            a, b = np.asarray(got[p]), np.asarray(v)
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                raise ValueError(f"the key map does not invert: {c}:{p} changes after saving and converting back")
    return out, unmatched

"""Masks over parameter paths and ordered rules (the table that explains them: :mod:`jaxfer.param_table`).

A :class:`Mask` is an immutable predicate over parameter paths (see
:mod:`jaxfer.tree` for the path language). Masks compose like sets::

    m = glob("bert/**") & ~bias()        # str(m) == "glob('bert/**') & ~bias()"
    resolve(m, params)                   # pytree of bool, what optax.masked wants

With ``strict=True`` (the default) every pattern a mask names must match at least
one path, so a typo raises :class:`jaxfer.tree.NoMatchError` instead of silently
selecting nothing. Category selectors (:func:`bias`, :func:`norm`,
:func:`embeddings`, ...) describe kinds of parameters rather than name paths, so
they are exempt; a *rule* built from one is still checked (see below).

Ordered rules (big_vision style) map paths to values, first match wins::

    rules = [("classifier/**", 1.0), (layers(2), 0.5), ("**", None)]
    values, decided_by = apply_rules(params, rules)

The value is generic (``None`` = frozen and a float = lr multiplier for the
optimizer; a ``PartitionSpec`` for sharding; a flag for re-initialisation).
:func:`apply_rules` raises when a rule matches no path, when a rule is shadowed
(it matches paths, but earlier rules decide all of them), and when a leaf is
matched by no rule.

Layer-wise lr decay follows BEiT/ELECTRA: with ``L`` layers, a leaf gets a
*layer id* ``z``: ``z = i + 1`` for a leaf inside layer ``i`` (found by the layer
pattern), ``z = 0`` for embeddings (:func:`embeddings`) outside the layers and
``z = L + 1`` for everything else (head, pooler, final norm); its multiplier is
``decay ** (L + 1 - z)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from jaxfer import tree
from jaxfer.errors import JaxferError

PyTree = Any
MaskLike = Any  # Mask | str | re.Pattern | Sequence[str]
# `encoder/layer/<i>/` (BERT, ViT), `encoder/stages/<i>/` (ResNet), `encoder/layers|blocks/<i>/`,
# `h/<i>/` (GPT-2), `transformer/layer/<i>/` (DistilBERT). Models with two stacks (T5) need
# their family's pattern (`Family.layer_pattern_for(config)`, a `Stacks`).
DEFAULT_LAYER_PATTERN = r"(?:^|/)(?:encoder/(?:layer|layers|stages|blocks)|h|transformer/layer)/(\d+)(?:/|$)"


# ====================================================================== masks
class Mask:
    """A set of parameter paths, given by a predicate. Combine with ``& | ~ -``."""

    _prec = 4  # binding strength, for printing without redundant parentheses

    def selects(self, path: str) -> bool:
        raise NotImplementedError

    def atoms(self) -> Iterable["Mask"]:
        """The selectors this mask is built from (itself, for a selector)."""
        yield self

    def check(self, paths: Sequence[str]) -> None:
        """Raise :class:`tree.NoMatchError` if a pattern named inside matches no path."""
        for atom in self.atoms():
            atom._check(paths)

    def _check(self, paths: Sequence[str]) -> None:
        pass

    def __and__(self, other: MaskLike) -> "Mask":
        return And(self, as_mask(other))

    def __or__(self, other: MaskLike) -> "Mask":
        return Or(self, as_mask(other))

    def __sub__(self, other: MaskLike) -> "Mask":
        """``a - b == a & ~b``."""
        return And(self, Not(as_mask(other)))

    def __rand__(self, other: MaskLike) -> "Mask":
        return And(as_mask(other), self)

    def __ror__(self, other: MaskLike) -> "Mask":
        return Or(as_mask(other), self)

    def __rsub__(self, other: MaskLike) -> "Mask":
        return And(as_mask(other), Not(self))

    def __invert__(self) -> "Mask":
        return Not(self)

    def __bool__(self):
        raise TypeError("a Mask has no truth value; combine masks with &, | and ~, not and/or/not")

    def __call__(self, params: PyTree, *, strict: bool = True) -> PyTree:
        return resolve(self, params, strict=strict)

    def __repr__(self) -> str:
        return str(self)


def _wrap(m: Mask, prec: int) -> str:
    return f"({m})" if m._prec < prec else str(m)


@dataclasses.dataclass(frozen=True, repr=False)
class _Binary(Mask):
    left: Mask
    right: Mask
    _symbol = ""

    def atoms(self):
        yield from self.left.atoms()
        yield from self.right.atoms()

    def __str__(self):
        return f"{_wrap(self.left, self._prec)} {self._symbol} {_wrap(self.right, self._prec)}"


class And(_Binary):
    """``a & b``: paths in both."""

    _prec, _symbol = 2, "&"

    def selects(self, path):
        return self.left.selects(path) and self.right.selects(path)


class Or(_Binary):
    """``a | b``: paths in either."""

    _prec, _symbol = 1, "|"

    def selects(self, path):
        return self.left.selects(path) or self.right.selects(path)


@dataclasses.dataclass(frozen=True, repr=False)
class Not(Mask):
    inner: Mask
    _prec = 3

    def selects(self, path):
        return not self.inner.selects(path)

    def atoms(self):
        yield from self.inner.atoms()

    def __str__(self):
        return f"~{_wrap(self.inner, 3)}"


@dataclasses.dataclass(frozen=True, repr=False)
class Paths(Mask):
    """Paths matching any of ``patterns`` (globs, or regexes written ``re:...``)."""

    patterns: tuple[str, ...]

    def selects(self, path):
        return any(tree.compile_pattern(p).fullmatch(path) for p in self.patterns)

    def _check(self, paths):
        for p in self.patterns:
            rx = tree.compile_pattern(p)
            if not any(rx.fullmatch(q) for q in paths):
                raise tree.NoMatchError(p, paths, what="mask pattern")

    def __str__(self):
        if all(p.startswith(tree.REGEX_PREFIX) for p in self.patterns):
            return "regex(" + ", ".join(repr(p[len(tree.REGEX_PREFIX):]) for p in self.patterns) + ")"
        return "glob(" + ", ".join(map(repr, self.patterns)) + ")"


@dataclasses.dataclass(frozen=True, repr=False)
class Layers(Mask):
    """Leaves inside layers ``start <= i < stop`` (``stop=None``: up to the last)."""

    start: int
    stop: int | None = None
    pattern: Any = None  # None (DEFAULT_LAYER_PATTERN) | regex str | re.Pattern | path -> int|None

    def selects(self, path):
        i = layer_index(path, self.pattern)
        return i is not None and i >= self.start and (self.stop is None or i < self.stop)

    def _check(self, paths):
        if any(self.selects(p) for p in paths):
            return
        found = sorted({i for p in paths if (i := layer_index(p, self.pattern)) is not None})
        in_layers = [p for p in paths if layer_index(p, self.pattern) is not None] or paths
        err = tree.NoMatchError(str(self), in_layers, what="layer range")
        err.args = (err.args[0] + f"\nlayer indices present: {found or 'none'}",)
        raise err

    def __str__(self):
        args = [str(self.start)] + ([str(self.stop)] if self.stop is not None else [])
        if self.pattern is not None:
            args.append(f"pattern={getattr(self.pattern, '__name__', None) or self.pattern!r}")
        return f"layers({', '.join(args)})"


@dataclasses.dataclass(frozen=True, repr=False)
class Where(Mask):
    """Paths for which ``fn(path)`` is true; ``name`` is what ``str`` shows."""

    fn: Callable[[str], bool]
    name: str

    def selects(self, path):
        return bool(self.fn(path))

    def __str__(self):
        return self.name


# ----------------------------------------------------------------- selectors
def glob(*patterns: str) -> Mask:
    """Paths matching any of the glob patterns (``re:``-prefixed ones are regexes)."""
    if not patterns:
        raise ValueError("glob() needs at least one pattern")
    return Paths(tuple(tree.pattern_str(p) for p in patterns))


def regex(*patterns: str | re.Pattern) -> Mask:
    """Paths that a regex ``fullmatch``-es."""
    if not patterns:
        raise ValueError("regex() needs at least one pattern")
    return Paths(tuple(tree.pattern_str(p) if isinstance(p, re.Pattern) else tree.REGEX_PREFIX + p
                       for p in patterns))


def layers(start: int, stop: int | None = None, *, pattern: Any = None) -> Mask:
    """Leaves of layers ``start <= i < stop``; ``stop=None`` runs to the last layer.

    ``pattern`` finds the layer index in a path: a regex (``re.search``, first
    group; the ``layer_pattern`` of a model family in ``jaxfer.models.registry``)
    or a callable ``path -> int | None`` such as :class:`Stacks` (T5's encoder and
    decoder). The default finds ``encoder/layer/<i>/`` (BERT, ViT),
    ``encoder/stages/<i>/`` (ResNet), ``encoder/layers/<i>/``, ``encoder/blocks/<i>/``,
    ``h/<i>/`` (GPT-2) and ``transformer/layer/<i>/`` (DistilBERT).
    """
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"layers({start}, {stop}): need 0 <= start < stop")
    return Layers(start, stop, pattern)


@dataclasses.dataclass(frozen=True)
class Stacks:
    r"""A layer pattern for models with several layer stacks, numbered one after another.

    ``stacks`` is ``((regex, size), ...)`` in computation order; a regex's first group
    is the index within its stack. T5 with ``E`` encoder and ``D`` decoder layers::

        Stacks(((r"(?:^|/)encoder/block/(\d+)/", E), (r"(?:^|/)decoder/block/(\d+)/", D)))

    numbers encoder block ``i`` as layer ``i`` and decoder block ``j`` as ``E + j``,
    so ``layers(E)`` is the decoder, layer-wise lr decay runs from the decoder's top
    down through the encoder, and a cached prefix may end inside either stack. Works
    wherever a pattern is taken (it is a callable ``path -> int | None``).
    """

    stacks: tuple[tuple[str, int], ...]

    def _find(self, path: str) -> tuple[int, str] | None:
        offset = 0
        for regex, size in self.stacks:
            m = re.search(regex, path)
            if m is not None:
                i = int(m.group(1))
                if i >= size:
                    raise ValueError(f"{path!r}: layer {i} of a stack of {size} ({regex!r})")
                return offset + i, path[: m.end(1)]
            offset += size
        return None

    def __call__(self, path: str) -> int | None:
        found = self._find(path)
        return None if found is None else found[0]

    def module(self, path: str) -> str | None:
        """The path of the layer module holding ``path`` (``t5/encoder/block/3``), or None."""
        found = self._find(path)
        return None if found is None else found[1]

    def __str__(self):
        return "Stacks(" + ", ".join(f"{r!r} x {n}" for r, n in self.stacks) + ")"


def layer_index(path: str, pattern: Any = None) -> int | None:
    """The layer index of ``path`` under ``pattern`` (see :func:`layers`), or None."""
    if callable(pattern) and not isinstance(pattern, re.Pattern):
        return pattern(path)
    m = _compiled(pattern).search(path)
    return int(m.group(1)) if m else None


def layer_module(path: str, pattern: Any = None) -> tuple[int, str] | None:
    """``(layer index, path of the layer's module)`` for ``path``, or None outside the layers.

    The module path is ``path`` up to the index (``bert/encoder/layer/3``): what
    :mod:`jaxfer.transfer.prefix` cuts at. ``pattern`` is a regex or a :class:`Stacks`
    (a bare callable gives an index but no module: an error).
    """
    if isinstance(pattern, Stacks):
        return pattern._find(path)
    if callable(pattern) and not isinstance(pattern, re.Pattern):
        raise TypeError(f"layer pattern {pattern!r} gives no module paths; use a regex or masks.Stacks")
    m = _compiled(pattern).search(path)
    return (int(m.group(1)), path[: m.end(1)]) if m else None


def _compiled(pattern: Any) -> re.Pattern:
    if pattern is None:
        pattern = DEFAULT_LAYER_PATTERN
    if isinstance(pattern, str):
        pattern = re.compile(pattern.removeprefix(tree.REGEX_PREFIX))
    return pattern


def _segments(path: str) -> list[str]:
    return path.lower().split(tree.SEP)


_NORM_SEGMENT = re.compile(r".*norm.*|(?:.*_)?(?:ln|bn)(?:_?\d+|_.*)?")


def _is_bias(path: str) -> bool:
    return _segments(path)[-1] == "bias"


def _is_norm(path: str) -> bool:
    *modules, name = _segments(path)
    return name in ("gamma", "beta") or any(_NORM_SEGMENT.fullmatch(s) for s in modules)


def _is_embedding(path: str) -> bool:
    return any("embed" in s or s in ("wte", "wpe") for s in _segments(path))


_KINDS: dict[str, Mask] = {
    "bias": Where(_is_bias, "bias()"),
    "norm": Where(_is_norm, "norm()"),
    "embeddings": Where(_is_embedding, "embeddings()"),
    "everything": Where(lambda p: True, "everything()"),
    "nothing": Where(lambda p: False, "nothing()"),
}


def bias() -> Mask:
    """Leaves named ``bias``."""
    return _KINDS["bias"]


def norm() -> Mask:
    """Normalisation parameters: leaves under a module whose name contains ``norm``
    (LayerNorm, layernorm, BatchNorm_0, normalization, GroupNorm ...) or is an
    ``ln``/``bn`` name (``ln_f``, ``ln1``, ``bn2``), and leaves named gamma/beta."""
    return _KINDS["norm"]


def embeddings() -> Mask:
    """Leaves with a path segment containing ``embed`` (embeddings, embedder,
    embed_tokens ...) or named ``wte``/``wpe``."""
    return _KINDS["embeddings"]


def everything() -> Mask:
    return _KINDS["everything"]


def nothing() -> Mask:
    return _KINDS["nothing"]


def kind(*names: str) -> Mask:
    """Union of named kinds: ``kind("bias", "norm") == bias() | norm()``."""
    unknown = [n for n in names if n not in _KINDS]
    if unknown or not names:
        raise ValueError(f"unknown kind(s) {unknown}; known: {sorted(_KINDS)}")
    out = _KINDS[names[0]]
    for n in names[1:]:
        out = out | _KINDS[n]
    return out


def where(fn: Callable[[str], bool], name: str | None = None) -> Mask:
    """Paths for which ``fn(path)`` is true."""
    return Where(fn, name or f"where({getattr(fn, '__name__', 'fn')})")


def as_mask(x: MaskLike) -> Mask:
    """Mask | glob or ``re:`` string | compiled regex | list of patterns -> Mask."""
    if isinstance(x, Mask):
        return x
    if isinstance(x, re.Pattern):
        return regex(x)
    if isinstance(x, str):
        return regex(x[len(tree.REGEX_PREFIX):]) if x.startswith(tree.REGEX_PREFIX) else glob(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, re.Pattern)) for p in x):
        return glob(*x)
    raise TypeError(f"expected a Mask, a path pattern or a list of patterns, got {x!r}")


def resolve(mask: MaskLike, params: PyTree, *, strict: bool = True) -> PyTree:
    """``params``-shaped tree of Python bools: ``m_p = [p in mask]``."""
    mask = as_mask(mask)
    if strict:
        mask.check(tree.paths(params))
    return tree.map_with_path(lambda p, _: mask.selects(p), params)


# ====================================================================== rules
Rules = Sequence[tuple[MaskLike, Any]]


class Rule(NamedTuple):
    index: int
    mask: Mask
    value: Any
    text: str  # how the rule is named in errors and in explain's "decided by"


class ShadowedRuleError(JaxferError, ValueError):
    """A rule matches paths, but earlier rules decide every one of them."""


class UnmatchedPathError(JaxferError, ValueError):
    """Some leaves are matched by no rule."""


def compile_rules(rules: Rules | Mapping) -> tuple[Rule, ...]:
    """Normalise ``[(pattern | Mask, value), ...]`` (or an ordered dict) to :class:`Rule`s."""
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], (str, Mask)) \
            and not isinstance(rules[1], tuple):
        raise TypeError(f"rules must be a sequence of (pattern, value) pairs; did you mean [{rules!r}]?")
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            rule = (rule.mask, rule.value)
        pattern, value = rule
        mask = as_mask(pattern)
        text = pattern if isinstance(pattern, str) else str(mask)
        out.append(Rule(i, mask, value, text))
    return tuple(out)


def first_match(rules: Sequence[Rule], path: str) -> Rule | None:
    """The first rule whose mask selects ``path`` (no validation; pure in the path)."""
    return next((r for r in rules if r.mask.selects(path)), None)


def decide(params: PyTree, rules: Rules, *, strict: bool = True) -> dict[str, Rule]:
    """``{path: deciding Rule}`` for every leaf, validated as :func:`apply_rules` says."""
    rules = compile_rules(rules)
    paths = tree.paths(params)
    decided = {p: first_match(rules, p) for p in paths}
    if strict:
        for r in rules:
            hits = [p for p in paths if r.mask.selects(p)]
            if not hits:
                raise tree.NoMatchError(r.text, paths, what=f"rule {r.index}")
            try:
                r.mask.check(paths)
            except tree.NoMatchError as e:
                e.args = (f"in rule {r.index} ({r.text}): {e.args[0]}",)
                raise
            if not any(decided[p] is r for p in hits):
                by = sorted({f"{decided[p].index} ({decided[p].text})" for p in hits})
                raise ShadowedRuleError(
                    f"rule {r.index} ({r.text}) decides no parameter: every path it matches "
                    f"(e.g. {hits[0]!r}) is decided by earlier rule(s) {', '.join(by)}")
    unmatched = [p for p, r in decided.items() if r is None]
    if unmatched:
        raise UnmatchedPathError(
            f"{len(unmatched)} parameter path(s) match no rule, e.g.\n  " + "\n  ".join(unmatched[:5])
            + "\nend the rules with a catch-all such as ('**', value)")
    return decided


def apply_rules(params: PyTree, rules: Rules, *, strict: bool = True) -> tuple[PyTree, PyTree]:
    """``(values, decided_by)``, both shaped like ``params``: first match wins.

    ``values`` holds each leaf's rule value (``None`` values make absent leaves, as
    in :func:`tree.partition`); ``decided_by`` the deciding rule's text. Raises
    :class:`UnmatchedPathError` if a leaf has no rule; with ``strict``, also
    :class:`tree.NoMatchError` for a rule (or a pattern inside one) that matches no
    path and :class:`ShadowedRuleError` for a rule that decides no path.
    """
    decided = decide(params, rules, strict=strict)
    values = tree.map_with_path(lambda p, _: decided[p].value, params)
    decided_by = tree.map_with_path(lambda p, _: decided[p].text, params)
    return values, decided_by


def as_multiplier(value: Any) -> float | None:
    """Rule value -> lr multiplier: ``None``/``False`` frozen, ``True`` 1.0, numbers as is."""
    if value is None or value is False:
        return None
    if value is True:
        return 1.0
    return float(value)


def trainable_mask(params: PyTree, rules: Rules, *, strict: bool = True) -> PyTree:
    """Bool tree: ``True`` where the deciding rule's value is not ``None``."""
    decided = decide(params, rules, strict=strict)
    return tree.map_with_path(lambda p, _: as_multiplier(decided[p].value) is not None, params)


def layer_id(path: str, num_layers: int, pattern: Any = None) -> int:
    """BEiT layer id: ``i + 1`` inside layer ``i``, 0 for embeddings, else ``L + 1``."""
    i = layer_index(path, pattern)
    if i is not None:
        if i >= num_layers:
            raise ValueError(f"{path!r} is in layer {i}, but num_layers={num_layers}")
        return i + 1
    return 0 if _is_embedding(path) else num_layers + 1


def layer_decay_scale(path: str, decay: float, num_layers: int, pattern: Any = None) -> float:
    """``decay ** (L + 1 - layer_id(path))``."""
    return float(decay) ** (num_layers + 1 - layer_id(path, num_layers, pattern))


def infer_num_layers(params: PyTree, pattern: Any = None) -> int:
    """``1 + max`` layer index found in ``params`` (raises if there is none)."""
    found = [i for p in tree.paths(params) if (i := layer_index(p, pattern)) is not None]
    if not found:
        text = pattern if isinstance(pattern, str) else getattr(pattern, "__name__", str(pattern))
        raise tree.NoMatchError(text or DEFAULT_LAYER_PATTERN, tree.paths(params), what="layer pattern")
    return max(found) + 1


def lr_multipliers(params: PyTree, rules: Rules, *, strict: bool = True, layer_decay: float | None = None,
                   num_layers: int | None = None, layer_pattern: Any = None) -> PyTree:
    """Float tree: the rule's multiplier (frozen: 0.0), times the layer-decay scale."""
    decided = decide(params, rules, strict=strict)
    if layer_decay is not None and not layer_decay > 0:
        raise ValueError(f"layer_decay must be > 0 (None turns it off), got {layer_decay}")
    if layer_decay is not None and num_layers is None:
        num_layers = infer_num_layers(params, layer_pattern)

    def mult(path, _):
        m = as_multiplier(decided[path].value)
        if m is None:
            return 0.0
        if layer_decay is not None:
            m *= layer_decay_scale(path, layer_decay, num_layers, layer_pattern)
        return m

    return tree.map_with_path(mult, params)


def default_weight_decay_mask(params: PyTree) -> PyTree:
    """Bool tree for ``optax.adamw(mask=...)``: decay all but biases and norm params.

    Follows common practice (BERT, timm, HF Trainer): biases and LayerNorm/
    BatchNorm scales and biases are not decayed; embeddings are.
    """
    exempt = bias() | norm()
    return tree.map_with_path(lambda p, _: not exempt.selects(p), params)

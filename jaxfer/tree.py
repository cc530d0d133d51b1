"""Parameter paths: the interface every other part of jaxfer speaks.

Every leaf of a params pytree has a path string made of its keys joined by
``/``, e.g. ``encoder/layer/3/attention/self/query/kernel``. Masks, learning-rate
rules, re-initialisation on load and sharding rules are all rules over these
strings, written in one pattern language:

* glob (the default): ``*`` matches within one segment, ``**`` matches any number
  of whole segments (zero included), ``?`` one character, ``[0-7]`` a class;
* regex: a pattern starting with ``re:`` (or a compiled ``re.Pattern``), matched
  against the whole path with ``fullmatch``.

Partitioned trees use ``None`` for the leaves they leave out, so that
``jax.grad``, ``jax.jit`` and optax treat them as absent rather than as zeros.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxfer.errors import JaxferError

PyTree = Any
Pattern = str | re.Pattern
SEP = "/"
REGEX_PREFIX = "re:"


# --------------------------------------------------------------------- paths
def _key_str(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def keypath_str(keypath: Iterable) -> str:
    """``jax`` key path -> ``'a/b/0/c'``."""
    return SEP.join(_key_str(k) for k in keypath)


def flatten(tree: PyTree) -> dict[str, Any]:
    """Nested tree -> ``{path: leaf}`` in jax's leaf order (``None`` leaves dropped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {keypath_str(kp): leaf for kp, leaf in flat}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """``{path: leaf}`` -> nested dicts with string keys (the Flax params layout)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} goes through a leaf at {part!r}")
        if last in node:
            raise ValueError(f"duplicate path {path!r}")
        node[last] = leaf
    return out


def paths(tree: PyTree) -> list[str]:
    return list(flatten(tree))


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree_map`` where ``fn(path, leaf, *rest_leaves)`` also sees the path string."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(keypath_str(kp), x, *r), tree, *rest
    )


# ------------------------------------------------------------------ patterns
@functools.lru_cache(maxsize=4096)
def _glob_regex(glob: str) -> re.Pattern:
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**/", i):  # zero or more whole segments
            out.append(r"(?:[^/]+/)*")
            i += 3
        elif glob.startswith("/**", i) and i + 3 == n:  # a whole subtree
            out.append(r"(?:/.*)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(r".*")
            i += 2
        elif c == "*":
            out.append(r"[^/]*")
            i += 1
        elif c == "?":
            out.append(r"[^/]")
            i += 1
        elif c == "[":
            j = glob.find("]", i + 1)
            if j < 0:
                raise ValueError(f"unclosed '[' in pattern {glob!r}")
            body = glob[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def compile_pattern(pattern: Pattern) -> re.Pattern:
    """Glob or ``re:``-regex (or a compiled regex) -> compiled regex for ``fullmatch``."""
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"a path pattern must be a str or re.Pattern, got {type(pattern).__name__}")
    if pattern.startswith(REGEX_PREFIX):
        return re.compile(pattern[len(REGEX_PREFIX) :])
    return _glob_regex(pattern)


def match(pattern: Pattern, path: str) -> bool:
    """Whether ``pattern`` (glob or ``re:`` regex) matches the whole ``path``."""
    return compile_pattern(pattern).fullmatch(path) is not None


def pattern_str(pattern: Pattern) -> str:
    return REGEX_PREFIX + pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def nearest_paths(pattern: Pattern, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidate paths most similar to ``pattern``, for error messages."""
    candidates = list(candidates)
    text = pattern_str(pattern).removeprefix(REGEX_PREFIX)
    literal = re.sub(r"[*?\[\]^$()+\\{}|.]+", "", text)
    close = difflib.get_close_matches(text, candidates, n=n, cutoff=0.0)
    if literal:
        by_literal = difflib.get_close_matches(literal, candidates, n=n, cutoff=0.0)
        close = list(dict.fromkeys(by_literal + close))[:n]
    return close


class NoMatchError(JaxferError, ValueError):
    """A path pattern matched no parameter: never a silent no-op."""

    def __init__(self, pattern: Pattern, candidates: Iterable[str], what: str = "pattern"):
        self.pattern = pattern
        near = nearest_paths(pattern, candidates)
        msg = f"{what} {pattern_str(pattern)!r} matches no parameter path"
        if near:
            msg += "; nearest existing paths:\n  " + "\n  ".join(near)
        super().__init__(msg)


def select(pattern: Pattern, tree_or_paths: PyTree | Iterable[str], *, strict: bool = True) -> list[str]:
    """The paths matched by ``pattern``; raises :class:`NoMatchError` when none is."""
    all_paths = (
        list(tree_or_paths)
        if isinstance(tree_or_paths, (list, tuple)) and all(isinstance(p, str) for p in tree_or_paths)
        else paths(tree_or_paths)
    )
    rx = compile_pattern(pattern)
    hits = [p for p in all_paths if rx.fullmatch(p)]
    if strict and not hits:
        raise NoMatchError(pattern, all_paths)
    return hits


# -------------------------------------------------------- partition / merge
def partition(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Split ``tree`` by a boolean ``mask`` tree into ``(selected, rest)``.

    Both halves keep the full structure; the leaves each leaves out are ``None``.
    ``merge(selected, rest)`` gives ``tree`` back.
    """
    selected = jax.tree_util.tree_map(lambda x, m: x if m else None, tree, mask)
    rest = jax.tree_util.tree_map(lambda x, m: None if m else x, tree, mask)
    return selected, rest


def merge(*trees: PyTree) -> PyTree:
    """Leafwise: the first non-``None`` leaf among ``trees`` (inverse of :func:`partition`)."""

    def pick(*leaves):
        for leaf in leaves:
            if leaf is not None:
                return leaf
        return None

    return jax.tree_util.tree_map(pick, *trees, is_leaf=lambda x: x is None)


# -------------------------------------------------------------------- counts
def _size(x) -> int:
    return int(np.prod(np.shape(x))) if x is not None else 0


def _nbytes(x) -> int:
    if x is None:
        return 0
    dtype = getattr(x, "dtype", None) or np.asarray(x).dtype
    return _size(x) * np.dtype(dtype).itemsize


def count(tree: PyTree) -> int:
    """Number of scalar parameters."""
    return sum(_size(x) for x in jax.tree_util.tree_leaves(tree))


def nbytes(tree: PyTree) -> int:
    """Bytes held by the leaves (from shapes and dtypes; works on abstract trees)."""
    return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(tree))


def subtree_counts(tree: PyTree, depth: int = 1) -> dict[str, tuple[int, int]]:
    """``{path prefix of `depth` segments: (parameter count, bytes)}``."""
    out: dict[str, tuple[int, int]] = {}
    for path, leaf in flatten(tree).items():
        key = SEP.join(path.split(SEP)[:depth])
        c, b = out.get(key, (0, 0))
        out[key] = (c + _size(leaf), b + _nbytes(leaf))
    return out

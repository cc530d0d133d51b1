"""LoRA as a params transform: low-rank updates of kernels chosen by path rules, for any ``apply_fn``.

For a selected kernel ``W`` (its leading axes flattened to ``n_in``, the last
one ``n_out``) the model runs with::

    W' = W + s * reshape(A @ B),    A: [n_in, r],  B: [r, n_out],  s = alpha / r

``A ~ U(-1/sqrt(n_in), 1/sqrt(n_in))`` (the Kaiming-uniform default of Hugging
Face's peft) and ``B = 0``, so at initialisation ``W' = W`` bit for bit and the
model is the base model exactly.

Layout. The adapter lives in the params tree itself, under one top-level key,
one subtree per named adapter, mirroring the kernel's path::

    params["lora"][name][<kernel path>]["a" | "b"]
    # e.g. lora/default/bert/encoder/layer/0/attention/self/query/kernel/a

so everything that speaks paths handles it unchanged: ``("lora/**", 1.0)``
trains every adapter, ``("lora/tweets/**", 1.0)`` one of them, ``jf.explain``
lists them, optimizers hold state for them only, and trainable-only checkpoints
save them. :func:`wrap` turns an ``apply_fn`` over the base params into one over
these params: it adds the low-rank updates (its adapters' only) to the kernels
and calls the model with the plain base tree, so it works for every family, any
Linen module and any function of a params tree. With ``make_train_step``, rules
such as ``[("lora/**", 1.0), ("classifier/**", 1.0), ("**", None)]`` make the
base frozen: no gradient, no optimizer state, and its leaves come out of every
step bit-identical.

Dropout (``LoRA(dropout=p)``, training only) drops input rows of ``A`` --
inputs of the low-rank path -- with one mask per step and kernel, shared by the
batch (a materialised ``W'`` cannot drop per example as peft does on ``x``).

    params, spec = lora.add(model.params, [("**/attention/self/*/kernel", lora.LoRA(8, alpha=16))], rng=0)
    apply_fn = lora.wrap(jf.model_apply(model), spec)
    lora.save("tweets.safetensors", state.params, spec, include=["classifier/**"])  # ~0.3 MB for MiniLM
    merged = lora.merge(state.params, spec)       # plain base params again, W + s A B
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfer import masks, tree

PyTree = Any
KEY = "lora"  # the top-level params key adapters live under
_META = "jaxfer_lora"


@dataclasses.dataclass(frozen=True)
class LoRA:
    """A rule's value: rank ``r``, ``alpha`` (scale ``alpha / r``; None: ``alpha = r``), ``dropout``.

    ``in_axes``: how many leading kernel axes are inputs (None: all but the last,
    right for ``Dense`` ``[in, out]`` and ``Conv`` ``[kh, kw, c_in, c_out]``).
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    in_axes: int | None = None

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank


@dataclasses.dataclass(frozen=True)
class Spec:
    """A named adapter: ``targets`` maps kernel paths of the base params to their :class:`LoRA`."""

    name: str
    targets: tuple[tuple[str, LoRA], ...]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "targets": [[p, dataclasses.asdict(l)] for p, l in self.targets]})

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        d = json.loads(text)
        return cls(d["name"], tuple((p, LoRA(**l)) for p, l in d["targets"]))


# ---------------------------------------------------------------- building
def base_params(params: PyTree) -> dict:
    """``params`` without its adapters (the tree the model itself takes)."""
    return {k: v for k, v in params.items() if k != KEY}


def _matrix_shape(path: str, shape: tuple[int, ...], lo: LoRA) -> tuple[int, int]:
    k = len(shape) - 1 if lo.in_axes is None else lo.in_axes
    if len(shape) < 2 or not 1 <= k < len(shape):
        raise ValueError(f"LoRA needs a kernel with >= 2 axes and 1 <= in_axes < ndim; {path!r} has shape "
                         f"{shape} (in_axes={lo.in_axes}). Select kernels, e.g. '**/query/kernel'")
    return int(np.prod(shape[:k])), int(np.prod(shape[k:]))


def targets(params: PyTree, rules: masks.Rules, *, name: str = "default") -> Spec:
    """Resolve ``[(pattern | Mask, LoRA | None), ...]`` (first match wins) over the base params.

    Leaves no rule matches get no adapter. Every rule must match a path (else
    :class:`jaxfer.tree.NoMatchError` naming the nearest paths) and decide one
    (else :class:`jaxfer.masks.ShadowedRuleError`); a selected leaf must be a
    kernel with two or more axes; something must be selected.
    """
    if not name or tree.SEP in name:
        raise ValueError(f"adapter name must be a non-empty string without {tree.SEP!r}, got {name!r}")
    compiled = masks.compile_rules(rules)
    flat = tree.flatten(base_params(params))
    decided = {p: masks.first_match(compiled, p) for p in flat}
    for r in compiled:
        hits = [p for p in flat if r.mask.selects(p)]
        if not hits:
            raise tree.NoMatchError(r.text, list(flat), what=f"LoRA rule {r.index}")
        r.mask.check(list(flat))
        if not any(decided[p] is r for p in hits):
            raise masks.ShadowedRuleError(f"LoRA rule {r.index} ({r.text}) decides no parameter: earlier "
                                          f"rules decide every path it matches (e.g. {hits[0]!r})")
        if r.value is not None and not isinstance(r.value, LoRA):
            raise TypeError(f"LoRA rule {r.index} ({r.text}): value must be LoRA(...) or None, got {r.value!r}")
    decided = {p: r.value for p, r in decided.items() if r is not None}
    chosen = tuple((p, lo) for p, lo in decided.items() if lo is not None)
    if not chosen:
        raise ValueError("the LoRA rules select no kernel (every matching rule has value None)")
    for p, lo in chosen:
        _matrix_shape(p, np.shape(flat[p]), lo)
    return Spec(name, chosen)


def init(params: PyTree, spec: Spec, rng: jax.Array | int = 0) -> dict:
    """``params`` plus ``params["lora"][spec.name]`` (``A`` random, ``B`` zero)."""
    if spec.name in params.get(KEY, {}):
        raise ValueError(f"params already hold an adapter named {spec.name!r}")
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    flat = tree.flatten(base_params(params))
    out = {}
    for i, (path, lo) in enumerate(spec.targets):
        if path not in flat:
            raise KeyError(f"adapter {spec.name!r} targets {path!r}, which the params do not have")
        w = flat[path]
        n_in, n_out = _matrix_shape(path, np.shape(w), lo)
        bound = 1.0 / np.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (n_in, lo.rank), w.dtype, -bound, bound)
        out[path + tree.SEP + "a"] = a
        out[path + tree.SEP + "b"] = jnp.zeros((lo.rank, n_out), w.dtype)
    return {**params, KEY: {**params.get(KEY, {}), spec.name: tree.unflatten(out)}}


def add(params: PyTree, rules: masks.Rules, rng: jax.Array | int = 0, *, name: str = "default"
        ) -> tuple[dict, Spec]:
    """:func:`targets` then :func:`init`: ``(params with the adapter, its Spec)``."""
    spec = targets(params, rules, name=name)
    return init(params, spec, rng), spec


# ----------------------------------------------------------------- running
def _adapter(params: PyTree, spec: Spec) -> dict[str, jax.Array]:
    """The adapter's leaves, flat: ``{"<kernel path>/a": A, "<kernel path>/b": B, ...}``."""
    try:
        return tree.flatten(params[KEY][spec.name])
    except KeyError:
        raise KeyError(f"params hold no adapter named {spec.name!r} (have: "
                       f"{sorted(params.get(KEY, {}))})") from None


def _factors(params: PyTree, spec: Spec, path: str) -> tuple[jax.Array, jax.Array]:
    node = _adapter(params, spec)
    return node[path + tree.SEP + "a"], node[path + tree.SEP + "b"]


def delta(a: jax.Array, b: jax.Array, lo: LoRA, shape: tuple[int, ...]) -> jax.Array:
    """``s * reshape(A @ B)`` at full float32 precision (TPUs default to bf16 passes)."""
    return (lo.scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)).reshape(shape)


def merge(params: PyTree, *specs: Spec, rng: jax.Array | None = None) -> dict:
    """Base params with each spec's update added to its kernels, and those adapters removed.

    ``rng`` (training) applies each target's dropout to the rows of ``A``.
    Adapters not named stay under ``params["lora"]`` untouched.
    """
    flat = tree.flatten(base_params(params))
    for j, spec in enumerate(specs):
        node = _adapter(params, spec)
        for i, (path, lo) in enumerate(spec.targets):
            a, b = node[path + tree.SEP + "a"], node[path + tree.SEP + "b"]
            if rng is not None and lo.dropout:
                keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, j), i),
                                            1.0 - lo.dropout, (a.shape[0], 1))
                a = jnp.where(keep, a / (1.0 - lo.dropout), 0.0).astype(a.dtype)
            w = flat[path]
            flat[path] = w + delta(a, b, lo, w.shape).astype(w.dtype)
    out = tree.unflatten(flat)
    names = {s.name for s in specs}
    rest = {n: t for n, t in params.get(KEY, {}).items() if n not in names}
    return {**out, KEY: rest} if rest else out


def unmerge(merged: PyTree, adapters: Mapping[str, PyTree], *specs: Spec) -> dict:
    """Inverse of :func:`merge`: subtract the updates and put the adapters back.

    ``adapters`` is ``params["lora"]`` as it was before merging. ``W`` comes back
    to float rounding (``(W + d) - d``), not bit for bit; keep the base for that.
    """
    params = {**merged, KEY: {**merged.get(KEY, {}), **{s.name: adapters[s.name] for s in specs}}}
    flat = tree.flatten(base_params(params))
    for spec in specs:
        node = _adapter(params, spec)
        for path, lo in spec.targets:
            a, b = node[path + tree.SEP + "a"], node[path + tree.SEP + "b"]
            flat[path] = flat[path] - delta(a, b, lo, flat[path].shape).astype(flat[path].dtype)
    return {**tree.unflatten(flat), KEY: params[KEY]}


def wrap(apply_fn, *specs: Spec):
    """``apply_fn`` over base params -> one over params with adapters (see the module doc).

    The adapters named by ``specs`` are merged into the kernels inside the call
    (and so differentiated through); any other adapter under ``params["lora"]``
    is ignored. The model's own dropout rng is passed on unchanged.
    """
    if not specs:
        raise ValueError("lora.wrap needs at least one Spec")

    def lora_apply_fn(variables, batch, *, train, rng=None):
        lora_rng = jax.random.fold_in(rng, 0x10AA) if (train and rng is not None) else None
        params = base_params(merge(variables["params"], *specs, rng=lora_rng))
        return apply_fn({**variables, "params": params}, batch, train=train, rng=rng)

    return lora_apply_fn


# -------------------------------------------------------------- adapter I/O
def save(path: str | os.PathLike, params: PyTree, spec: Spec, *, include: Sequence[tree.Pattern] = ()) -> str:
    """Write the adapter alone (and the leaves ``include`` names, e.g. a new head) to safetensors.

    The file holds ``lora/<name>/...`` and the included base leaves under their
    paths, with the :class:`Spec` in its metadata: a few hundred kB for MiniLM
    at r=8, to apply onto the base with :func:`load`.
    """
    flat = {f"{KEY}/{spec.name}/{p}": v for p, v in tree.flatten(params[KEY][spec.name]).items()}
    base = tree.flatten(base_params(params))
    included: list[str] = []
    for pattern in include:
        included += tree.select(pattern, list(base))
    flat.update({p: base[p] for p in included})
    from safetensors.numpy import save_file

    path = os.fspath(path)
    save_file({k: np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}, path,
              metadata={_META: spec.to_json(), "include": json.dumps(sorted(set(included)))})
    return path


def load(path: str | os.PathLike, params: PyTree, *, name: str | None = None) -> tuple[dict, Spec]:
    """Apply an adapter file onto base ``params``: ``(params with it, its Spec)``.

    The adapter goes under ``params["lora"][name]`` (default: the saved name),
    next to any adapters already there; included leaves (a head) replace the
    base's, which must have them with the same shape. Mismatches are errors.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if _META not in meta:
            raise ValueError(f"{path}: not a jaxfer LoRA adapter file (no {_META!r} metadata)")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    spec = Spec.from_json(meta[_META])
    saved_name = spec.name
    spec = dataclasses.replace(spec, name=name or spec.name)
    base = tree.flatten(base_params(params))
    for p in json.loads(meta.get("include", "[]")):
        if p not in base or np.shape(base[p]) != arrays[p].shape:
            raise ValueError(f"{path}: included leaf {p!r} {arrays[p].shape} does not fit the params "
                             f"({np.shape(base[p]) if p in base else 'absent'})")
        base[p] = jnp.asarray(arrays[p], base[p].dtype)
    prefix = f"{KEY}/{saved_name}/"
    adapter = {k[len(prefix):]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    for p, lo in spec.targets:
        if p not in base:
            raise ValueError(f"{path}: adapter targets {p!r}, which the params do not have")
        n_in, n_out = _matrix_shape(p, np.shape(base[p]), lo)
        if adapter[p + "/a"].shape != (n_in, lo.rank) or adapter[p + "/b"].shape != (lo.rank, n_out):
            raise ValueError(f"{path}: adapter factors for {p!r} do not fit its shape {np.shape(base[p])}")
    out = {**tree.unflatten(base), **({KEY: params[KEY]} if KEY in params else {})}
    if spec.name in out.get(KEY, {}):
        raise ValueError(f"params already hold an adapter named {spec.name!r}; load it with name=...")
    out[KEY] = {**out.get(KEY, {}), spec.name: tree.unflatten(adapter)}
    return out, spec

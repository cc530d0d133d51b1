"""Bottleneck adapters (Houlsby et al. 2019) on the outputs of chosen Dense modules, without editing model code.

For a selected module whose output is ``y`` (width ``d``) the model runs with::

    y' = y + act(y @ D + b_D) @ U + b_U,    D: [d, m],  U: [m, d],  m = the bottleneck size

``D ~ U(-1/sqrt(d), 1/sqrt(d))`` and ``U = 0``, ``b_D = b_U = 0``, so at
initialisation ``y' = y`` bit for bit. On the attention output projection and
the MLP output projection of a transformer layer (:data:`HOULSBY`: after each
sublayer, before its residual sum and LayerNorm) this is Houlsby's adapter;
on the MLP output alone (:data:`PFEIFFER`) Pfeiffer's.

Layout, as for LoRA: the adapters are leaves of the params tree under one key,
mirroring the module's path::

    params["adapters"][name][<module path>]["down" | "up"]["kernel" | "bias"]
    # e.g. adapters/default/bert/encoder/layer/0/output/dense/down/kernel

so ``("adapters/**", 1.0)`` trains them (:func:`jaxfer.transfer.presets.adapters`).
Rules select the module by its ``kernel`` leaf (``**/output/dense/kernel``), in
the one path language, with the usual errors for rules matching nothing.

:func:`wrap` runs the model under ``flax.linen.intercept_methods``: every call
of a selected module gets the adapter added to its output. The model's code is
untouched, so this works for any Linen model (BERT, RoBERTa, ViT and others)
whose Dense modules have stable paths; not for non-Linen ``apply_fn``\\ s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer import masks, tree

PyTree = Any
KEY = "adapters"
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """A rule's value: bottleneck ``size`` ``m`` and the ``activation`` between ``D`` and ``U``."""

    size: int = 64
    activation: str = "relu"

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"adapter size must be an integer >= 1, got {self.size!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")


# The transformer layers of the built-in families (BERT/RoBERTa and ViT share these module names).
ATTENTION_OUT = "**/encoder/layer/*/attention/output/dense/kernel"
MLP_OUT = "**/encoder/layer/*/output/dense/kernel"


def houlsby(size: int = 64, activation: str = "relu") -> tuple:
    """Rules: adapters after the attention and the MLP block of every layer."""
    return ((ATTENTION_OUT, Bottleneck(size, activation)), (MLP_OUT, Bottleneck(size, activation)))


def pfeiffer(size: int = 64, activation: str = "relu") -> tuple:
    """Rules: an adapter after the MLP block of every layer."""
    return ((MLP_OUT, Bottleneck(size, activation)),)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A named set of adapters: ``targets`` maps module paths to ``(width d, Bottleneck)``."""

    name: str
    targets: tuple[tuple[str, int, Bottleneck], ...]


def base_params(params: PyTree) -> dict:
    return {k: v for k, v in params.items() if k != KEY}


def targets(params: PyTree, rules: masks.Rules, *, name: str = "default") -> Spec:
    """Resolve ``[(pattern | Mask, Bottleneck | None), ...]`` (first match wins) over ``kernel`` leaves."""
    if not name or tree.SEP in name:
        raise ValueError(f"adapter name must be a non-empty string without {tree.SEP!r}, got {name!r}")
    compiled = masks.compile_rules(rules)
    flat = tree.flatten(base_params(params))
    decided = {p: masks.first_match(compiled, p) for p in flat}
    for r in compiled:
        hits = [p for p in flat if r.mask.selects(p)]
        if not hits:
            raise tree.NoMatchError(r.text, list(flat), what=f"adapter rule {r.index}")
        r.mask.check(list(flat))
        if not any(decided[p] is r for p in hits):
            raise masks.ShadowedRuleError(f"adapter rule {r.index} ({r.text}) decides no parameter: earlier "
                                          f"rules decide every path it matches (e.g. {hits[0]!r})")
        if r.value is not None and not isinstance(r.value, Bottleneck):
            raise TypeError(f"adapter rule {r.index} ({r.text}): value must be Bottleneck(...) or None")
    chosen = []
    for p, r in decided.items():
        if r is None or r.value is None:
            continue
        module, _, leaf = p.rpartition(tree.SEP)
        if leaf != "kernel" or np.ndim(flat[p]) < 2:
            raise ValueError(f"adapter rule {r.index} ({r.text}) selects {p!r}; select a module's 'kernel' "
                             "leaf (the adapter goes on that module's output)")
        chosen.append((module, int(np.shape(flat[p])[-1]), r.value))
    if not chosen:
        raise ValueError("the adapter rules select no module (every matching rule has value None)")
    return Spec(name, tuple(chosen))


def init(params: PyTree, spec: Spec, rng: jax.Array | int = 0) -> dict:
    """``params`` plus ``params["adapters"][spec.name]`` (``D`` random, ``U`` and biases zero)."""
    if spec.name in params.get(KEY, {}):
        raise ValueError(f"params already hold adapters named {spec.name!r}")
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    out = {}
    for i, (module, d, b) in enumerate(spec.targets):
        bound = 1.0 / np.sqrt(d)
        out[module] = {"down": {"kernel": jax.random.uniform(jax.random.fold_in(rng, i), (d, b.size),
                                                              jnp.float32, -bound, bound),
                                "bias": jnp.zeros((b.size,), jnp.float32)},
                       "up": {"kernel": jnp.zeros((b.size, d), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}}
    flat = {f"{m}/{k}": v for m, t in out.items() for k, v in tree.flatten(t).items()}
    return {**params, KEY: {**params.get(KEY, {}), spec.name: tree.unflatten(flat)}}


def add(params: PyTree, rules: masks.Rules, rng: jax.Array | int = 0, *, name: str = "default"
        ) -> tuple[dict, Spec]:
    """:func:`targets` then :func:`init`."""
    spec = targets(params, rules, name=name)
    return init(params, spec, rng), spec


def bottleneck(p: PyTree, y: jax.Array, activation: str) -> jax.Array:
    """``act(y D + b_D) U + b_U`` for one adapter's params ``p``."""
    h = ACTIVATIONS[activation](y @ p["down"]["kernel"].astype(y.dtype) + p["down"]["bias"].astype(y.dtype))
    return h @ p["up"]["kernel"].astype(y.dtype) + p["up"]["bias"].astype(y.dtype)


def wrap(apply_fn, *specs: Spec):
    """``apply_fn`` of a Linen model -> one over params with adapters (see the module doc)."""
    if not specs:
        raise ValueError("adapters.wrap needs at least one Spec")
    by_module: dict[str, list[tuple[str, Bottleneck]]] = {}
    for spec in specs:
        for module, _, b in spec.targets:
            by_module.setdefault(module, []).append((spec.name, b))

    def adapter_apply_fn(variables, batch, *, train, rng=None):
        params = variables["params"]
        held = params.get(KEY, {})
        missing = [s.name for s in specs if s.name not in held]
        if missing:
            raise KeyError(f"params hold no adapters named {missing} (have: {sorted(held)})")
        seen: set[str] = set()

        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            path = tree.SEP.join(map(str, context.module.path))
            if context.method_name != "__call__" or path not in by_module:
                return y
            seen.add(path)
            out = y
            for name, b in by_module[path]:
                node = held[name]
                for part in path.split(tree.SEP):
                    node = node[part]
                out = out + bottleneck(node, y, b.activation)
            return out

        with nn.intercept_methods(interceptor):
            result = apply_fn({**variables, "params": base_params(params)}, batch, train=train, rng=rng)
        if len(seen) != len(by_module):
            raise ValueError(f"adapter modules never called by the model: {sorted(set(by_module) - seen)[:5]} "
                             "(a non-Linen apply_fn, or modules called under other paths)")
        return result

    return adapter_apply_fn

"""Cached frozen prefix: compute the activations at a layer boundary once, train above it.

When every parameter below a boundary is frozen, the frozen part runs in
inference mode (:func:`jaxfer.train.step.frozen_inference_scope`) and the inputs
are not randomly augmented, the boundary activations of an example are the same
at every step. Then

    loss(theta_top; x) = L(top(theta_top; prefix(theta_frozen; x)))

needs ``prefix(x)`` once per example: :func:`compute` runs it over a source
(with :mod:`jaxfer.transfer.features`, keyed by example id, cached on disk), and
:func:`cached_apply` runs the model with the boundary module's output replaced by
the cached one (``batch["boundary"]``), so under ``jit`` XLA drops the prefix
and the step costs the layers above. The attention mask stays in the batch, so
the layers above see it as before.

The boundary is a module path, and "run from layer ``k``" for a family is
replacing the output of the module that holds layer ``k - 1``: the one that the
family's ``layer_pattern`` names (``bert/encoder/layer/3`` for BERT/RoBERTa and
ViT, ``resnet/encoder/stages/1`` for ResNet stages). Nothing in the model
changes; any Linen model whose layers are submodules works the same way.

:func:`plan` decides whether caching is exact for a model, its trainable mask
and its data, by looking at the computation itself: it traces the training-mode
boundary output and lists every parameter and random key it depends on. The
cache is used only when none of them trains and no dropout reaches it; else the
plan says why not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxfer import masks, tree
from jaxfer.train.step import frozen_inference_scope, module_status
from jaxfer.transfer import features as features_lib

BOUNDARY_KEY = "boundary"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where to cut, or why not.

    Attributes:
      module: path of the module whose output is cached (``None``: no caching).
      layer: index of the first layer that runs on the cache (``k``).
      num_layers: layers in the family (``L``).
      reason: why the cache is not used, when ``module`` is ``None``.
    """

    module: str | None
    layer: int | None = None
    num_layers: int | None = None
    reason: str | None = None

    @property
    def exact(self) -> bool:
        return self.module is not None

    def describe(self) -> str:
        if not self.exact:
            return f"cached frozen prefix: not used ({self.reason})"
        return (f"cached frozen prefix: {self.span()} of {self.num_layers} "
                f"{'runs' if self.layer == 1 else 'run'} once per example; training runs from "
                f"{self.module!r} up")

    def span(self) -> str:
        """``"layer 0"`` or ``"layers 0-3"``: what the cache replaces."""
        return "layer 0" if self.layer == 1 else f"layers 0-{self.layer - 1}"


def _layer_modules(paths: Sequence[str], layer_pattern: Any) -> dict[int, str]:
    """``{i: module path of layer i}`` from the param paths (the path up to the index)."""
    modules: dict[int, str] = {}
    for path in paths:
        found = masks.layer_module(path, layer_pattern)
        if found is not None:
            modules.setdefault(*found)
    return modules


def _used_inputs(closed_jaxpr) -> list[bool]:
    """Which inputs of a jaxpr its outputs depend on (conservatively: an equation's
    outputs depend on all its inputs)."""
    jaxpr = closed_jaxpr.jaxpr
    needed = {id(v) for v in jaxpr.outvars if hasattr(v, "aval") and not hasattr(v, "val")}
    for eqn in reversed(jaxpr.eqns):
        if any(id(v) in needed for v in eqn.outvars):
            needed.update(id(v) for v in eqn.invars if not hasattr(v, "val"))
    return [id(v) in needed for v in jaxpr.invars]


def boundary_fn(model: Any, path: str, *, train: bool = False, status: Mapping[str, bool] | None = None,
                input_keys: Sequence[str] | None = None):
    """``fn(variables, batch, rng) -> output of the module at path``; with ``train``, as in
    the train step (frozen modules in inference mode by ``status``, dropout drawing ``rng``).
    ``model``: the task model (a Linen module) or the ``apply_fn`` the run trains with."""
    apply_fn = features_lib.as_apply(model, input_keys)

    def fn(variables, batch, rng=None):
        captured: list[Any] = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and "/".join(map(str, context.module.path)) == path:
                captured.append(out)
            return out

        with frozen_inference_scope(status or {}), nn.intercept_methods(interceptor):
            apply_fn(variables, batch, train=train, rng=rng)
        if len(captured) != 1:
            raise ValueError(f"module {path!r} ran {len(captured)} times in one call; a boundary runs once")
        return captured[0]

    return fn


def plan(model: Any, variables: Mapping[str, Any], trainable: Any, batch: Mapping[str, Any], *,
         layer_pattern: Any, augmented: str | None = None, frozen_dropout: bool = True,
         input_keys: Sequence[str] | None = None) -> Plan:
    """Whether, and where, the frozen prefix of ``model`` can be cached exactly.

    Args:
      model: the task model (a Linen module), or the ``apply_fn`` the run trains
        with (LoRA- or adapter-wrapped: their parameters then count too).
      variables: ``{"params": ..., **model_state}``.
      trainable: the bool mask over the params.
      batch: an example training batch (its shapes; values unused).
      layer_pattern: regex whose first group is the layer index in a param path,
        or a :class:`jaxfer.masks.Stacks` (the model family's
        ``layer_pattern_for(config)``: T5's encoder then decoder blocks).
      augmented: when the training inputs are randomly augmented, a few words
        saying how (then nothing is cached).
      frozen_dropout: whether the train step runs frozen modules without dropout.

    The boundary is the output of layer ``k - 1``, ``k`` the first layer with a
    trainable parameter (the last layer when only parts above the layers train).
    It is cached only if its training-mode value depends on no trainable
    parameter and no random key: checked on the traced computation, not assumed.
    """
    flat_mask = tree.flatten(trainable)
    modules = _layer_modules(list(flat_mask), layer_pattern)
    if augmented:
        return Plan(None, reason=f"the training inputs are randomly augmented ({augmented})")
    if not modules:
        return Plan(None, reason=f"no parameter path matches the layer pattern {layer_pattern!r}")
    num_layers = max(modules) + 1
    layer_of = {p: i for p in flat_mask if (i := masks.layer_index(p, layer_pattern)) is not None}
    trained_layers = sorted({layer_of[p] for p, t in flat_mask.items() if t and p in layer_of})
    if not any(flat_mask.values()):
        return Plan(None, reason="nothing trains")
    k = trained_layers[0] if trained_layers else num_layers
    if k == 0:
        return Plan(None, reason=f"layer 0 ({modules[0]!r}) trains: there is no frozen prefix")
    path = modules[k - 1]
    status = module_status(trainable)

    fn = boundary_fn(model, path, train=True, status=status if frozen_dropout else {}, input_keys=input_keys)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaf_paths = [tree.keypath_str(kp) for kp, _ in leaves]
    example = {k_: v for k_, v in batch.items() if k_ not in ("label", "mask", features_lib.ID_KEY)}
    try:
        closed = jax.make_jaxpr(lambda vs, b, r: fn(jax.tree_util.tree_unflatten(treedef, vs), b, r))(
            [leaf for _, leaf in leaves], example, jax.random.key(0))
    except Exception as e:  # a model that cannot run its prefix alone
        return Plan(None, reason=f"tracing the output of {path!r} failed: {type(e).__name__}: {e}")
    used = _used_inputs(closed)
    n_leaves = len(leaf_paths)
    used_vars = [p for p, u in zip(leaf_paths, used[:n_leaves]) if u]
    uses_rng = any(used[-len(jax.tree_util.tree_leaves(jax.random.key(0))):])
    trained = [p for p in used_vars if p.startswith("params/") and flat_mask.get(p[len("params/"):], False)]
    if trained:
        return Plan(None, reason=f"the output of {path!r} depends on trainable parameters, e.g. "
                                 f"{', '.join(trained[:3])}")
    if uses_rng:
        why = ("frozen_dropout is off, so frozen modules keep their dropout" if not frozen_dropout else
               "a dropout below it belongs to a module that trains")
        return Plan(None, reason=f"the output of {path!r} is random in training: {why}")
    return Plan(path, layer=k, num_layers=num_layers)


def compute(model: Any, variables: Mapping[str, Any], path: str, batches, *, directory: str | None = None,
            key: str | None = None, input_keys: Sequence[str] | None = None,
            chunk_batches: int = 16) -> features_lib.Features:
    """The output of the module at ``path`` for every example of ``batches``, in
    inference mode, keyed by example id (cached under ``directory/key`` when given)."""
    fn = boundary_fn(model, path, train=False, input_keys=input_keys)
    return features_lib.cached(lambda v, b: fn(v, b), variables, batches, directory=directory,
                               key=key or "prefix", chunk_batches=chunk_batches)


def cached_apply(model: Any, path: str, *, key: str = BOUNDARY_KEY,
                 input_keys: Sequence[str] | None = None):
    """``apply_fn(variables, batch, *, train, rng)`` (the :mod:`jaxfer.train.step`
    contract) that takes the output of the module at ``path`` from ``batch[key]``.

    ``model``: a Linen module or an ``apply_fn`` (wrapped by LoRA, say). Every
    other batch entry (attention mask, ...) reaches the model as before; what
    only fed the cached module is dead code that ``jit`` removes.
    """
    apply_fn = features_lib.as_apply(model, input_keys)

    def apply(variables, batch, *, train: bool, rng=None):
        boundary = batch[key]
        rest = {k: v for k, v in batch.items() if k != key}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and "/".join(map(str, context.module.path)) == path:
                return boundary
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(variables, rest, train=train, rng=rng)

    return apply

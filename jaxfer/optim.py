"""Optimizers from path rules: freezing, lr multipliers, layer-wise decay, schedules.

:func:`build` wraps any optax transformation ``tx`` so that, for gradients ``g``::

    frozen leaf p     (rule value None):   u_p = 0              (no optimizer state)
    trainable leaf p  (rule value m_p):    u = tx(clip(g_T))    over trainable leaves T
                                           u_p <- m_p * s_p * u_p

where ``clip`` rescales ``g_T`` to global norm ``<= clip_norm`` (the norm taken over
the trainable leaves only) and ``s_p = decay ** (L + 1 - layer_id(p))`` is the
layer-wise decay scale (BEiT convention, see :mod:`jaxfer.masks`; ``s_p = 1``
without ``layer_decay``). Scaling the update of an optimizer such as AdamW scales
its learning rate and its decoupled weight decay alike, as per-group lrs do.

Frozen leaves are split off with ``optax.partition`` into ``optax.set_to_zero()``,
so the inner optimizer allocates state for trainable leaves only. ``update``
accepts gradient (and params) trees in either form a step function may pass:
the full tree (frozen gradients are ignored; their updates are zeros) or a tree
whose frozen leaves are ``None`` (their updates are ``None`` too, so the compiled
step never computes or touches them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxfer import masks, tree

PyTree = Any
TRAINABLE, FROZEN = "trainable", "frozen"


def scale_by_path(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
    """``u_p <- multiplier(p) * u_p``, with ``p`` the leaf's path (stateless)."""

    def scale(path, u):
        m = multiplier(path)
        return u if m == 1.0 else u * m

    def update(updates, state, params=None):
        del params
        return tree.map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build(tx: optax.GradientTransformation, rules: masks.Rules = (("**", 1.0),), *,
          layer_decay: float | None = None, num_layers: int | None = None, layer_pattern: Any = None,
          clip_norm: float | None = None, strict: bool = True) -> optax.GradientTransformationExtraArgs:
    """``tx`` restricted to the trainable leaves that ``rules`` name (see module doc).

    Args:
      tx: any optax transformation, e.g. ``optax.adamw(schedule, weight_decay=0.01,
        mask=masks.default_weight_decay_mask)``; it sees the trainable leaves only.
      rules: ordered ``(pattern | Mask, value)`` pairs, first match wins; a value
        is ``None`` (frozen) or an lr multiplier. Checked against the params at
        ``init`` (:func:`masks.apply_rules`, strict).
      layer_decay: BEiT-style layer-wise lr decay factor; needs ``num_layers``.
      num_layers: ``L``, the number of layers (``Family.num_layers(config)``).
      layer_pattern: where the layer index is in a path (see :func:`masks.layers`).
      clip_norm: clip the trainable gradients to this global norm before ``tx``.
      strict: rules that match no parameter (or only parameters an earlier rule
        took) are errors; ``False`` allows them (rules generated for training
        phases, see :mod:`jaxfer.transfer.phases`).

    ``init`` must see the full params tree; ``update`` takes full trees or trees
    with ``None`` at the frozen leaves.
    """
    compiled = masks.compile_rules(rules)
    if layer_decay is not None:
        if num_layers is None:
            raise ValueError("layer_decay needs num_layers (e.g. the model family's num_layers(config))")
        if not layer_decay > 0:
            raise ValueError(f"layer_decay must be > 0 (None turns it off), got {layer_decay}")

    def multiplier(path: str) -> float | None:
        rule = masks.first_match(compiled, path)
        if rule is None:
            raise masks.UnmatchedPathError(f"no rule matches {path!r}; end the rules with ('**', value)")
        m = masks.as_multiplier(rule.value)
        if m is not None and layer_decay is not None:
            m *= masks.layer_decay_scale(path, layer_decay, num_layers, layer_pattern)
        return m

    def labels(updates):
        return tree.map_with_path(lambda p, _: FROZEN if multiplier(p) is None else TRAINABLE, updates)

    trainable_tx = optax.chain(
        *([optax.clip_by_global_norm(clip_norm)] if clip_norm is not None else []),
        tx,
        scale_by_path(multiplier),
    )
    inner = optax.partition({TRAINABLE: trainable_tx, FROZEN: optax.set_to_zero()}, labels)

    def init(params):
        masks.decide(params, compiled, strict=strict)
        for path in tree.paths(params):  # layer ids in range, layer pattern sane
            multiplier(path)
        return inner.init(params)

    def update(updates, state, params=None, **extra_args):
        missing = jax.tree.map(lambda u: u is None, updates, is_leaf=_is_none)
        if not any(jax.tree.leaves(missing)):
            return inner.update(updates, state, params, **extra_args)
        for path, is_missing in tree.flatten(missing).items():
            if is_missing and multiplier(path) is not None:
                raise ValueError(f"update got no gradient (None) for trainable parameter {path!r}")
        updates = _fill_none(updates)
        params = None if params is None else _fill_none(params)
        out, state = inner.update(updates, state, params, **extra_args)
        return jax.tree.map(lambda m, u: None if m else u, missing, out), state

    return optax.GradientTransformationExtraArgs(init, update)


def _is_none(x) -> bool:
    return x is None


def _fill_none(t: PyTree) -> PyTree:
    """``None`` leaves -> scalar zero placeholders (frozen; their updates are dropped)."""
    return jax.tree.map(lambda x: jnp.zeros((), jnp.float32) if x is None else x, t, is_leaf=_is_none)


# ================================================================= schedules
SCHEDULES = ("constant", "warmup_constant", "warmup_linear", "warmup_cosine")


def schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0, *,
             end_factor: float = 0.0) -> optax.Schedule:
    """Learning rate ``eta(t)`` for step ``t`` (call it to read the lr at any step).

    Warmup is linear from 0: ``eta(t) = lr * t / W`` for ``t < W``. After it, with
    ``f = clip((t - W) / (T - W), 0, 1)`` and ``e = end_factor * lr``:

    * ``constant``:        ``eta = lr`` (no warmup allowed; see ``warmup_constant``)
    * ``warmup_constant``: ``eta = lr``
    * ``warmup_linear``:   ``eta = lr + (e - lr) * f``
    * ``warmup_cosine``:   ``eta = e + (lr - e) * (1 + cos(pi f)) / 2``
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if name == "constant" and warmup_steps:
        raise ValueError("the 'constant' schedule has no warmup; use 'warmup_constant'")
    if not 0 <= warmup_steps < max(total_steps, 1) and name != "warmup_constant":
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    lr, end = float(lr), float(lr) * float(end_factor)
    decay_steps = max(total_steps - warmup_steps, 1)

    def after_warmup(t):
        f = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
        if name == "warmup_linear":
            return lr + (end - lr) * f
        if name == "warmup_cosine":
            return end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * f))
        return jnp.full_like(f, lr)

    def eta(step):
        t = jnp.asarray(step, jnp.float32)
        if not warmup_steps:
            return after_warmup(t)
        return jnp.where(t < warmup_steps, lr * t / warmup_steps, after_warmup(t))

    return eta


# =============================================================== from config
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _no_weight_decay(name):
    def check(wd):
        if wd:
            raise ValueError(f"optimizer {name!r} has no weight decay; use 'adamw' (or set weight_decay=0)")
    return check


def _adam(lr, cfg, wd, wd_mask):
    _no_weight_decay("adam")(wd)
    return optax.adam(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.999), eps=_get(cfg, "eps", 1e-8))


def _adamw(lr, cfg, wd, wd_mask):
    return optax.adamw(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.999), eps=_get(cfg, "eps", 1e-8),
                       weight_decay=wd, mask=wd_mask)


def _sgd(lr, cfg, wd, wd_mask):
    """SGD (with ``momentum``/``nesterov`` if set); ``weight_decay`` as L2 added to the gradient."""
    sgd = optax.sgd(lr, momentum=_get(cfg, "momentum", 0.0) or None, nesterov=bool(_get(cfg, "nesterov", False)))
    return optax.chain(optax.add_decayed_weights(wd, wd_mask), sgd) if wd else sgd


def _lion(lr, cfg, wd, wd_mask):
    return optax.lion(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.99), weight_decay=wd, mask=wd_mask)


def _lamb(lr, cfg, wd, wd_mask):
    return optax.lamb(lr, b1=_get(cfg, "b1", 0.9), b2=_get(cfg, "b2", 0.999), eps=_get(cfg, "eps", 1e-6),
                      weight_decay=wd, mask=wd_mask)


OPTIMIZERS: dict[str, Callable] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd, "lion": _lion, "lamb": _lamb}


def from_config(cfg: Any, rules: masks.Rules = (("**", 1.0),), *, total_steps: int,
                num_layers: int | None = None, layer_pattern: Any = None,
                regularizer: optax.GradientTransformation | None = None, start_step: int = 0,
                strict: bool = True) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """``(tx, schedule)`` from an optimizer config (a ConfigDict or a dict).

    Keys: ``name`` (one of :data:`OPTIMIZERS`), ``lr``, ``schedule`` (default
    ``warmup_cosine``), ``warmup_steps`` (0), ``end_factor`` (0), ``weight_decay``
    (0; biases and norm params are exempt, :func:`masks.default_weight_decay_mask`),
    ``clip_norm`` (None/0 = off), ``layer_decay`` (None/0 = off), and per optimizer
    ``b1``, ``b2``, ``eps``, ``momentum``, ``nesterov``. ``regularizer`` (e.g.
    ``transfer.regularizers.l2_sp``) adds its gradient before the optimizer, on the
    trainable leaves only.

    ``start_step``: the schedule covers the optimizer's steps ``[start_step,
    start_step + total_steps)`` (``eta(t - start_step)``, 0 before): a training
    phase that starts mid-run with the run's step count carried over.
    """
    name = _get(cfg, "name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    if _get(cfg, "lr") is None:
        raise ValueError("the optimizer config needs a learning rate: lr")
    sched = schedule(_get(cfg, "schedule", "warmup_cosine"), _get(cfg, "lr"), total_steps,
                     int(_get(cfg, "warmup_steps", 0)), end_factor=_get(cfg, "end_factor", 0.0))
    if start_step:
        inner, sched = sched, lambda t: inner(jnp.maximum(jnp.asarray(t, jnp.float32) - start_step, 0.0))
    wd = float(_get(cfg, "weight_decay", 0.0))
    opt = OPTIMIZERS[name](sched, cfg, wd, masks.default_weight_decay_mask)
    if regularizer is not None:
        opt = optax.chain(regularizer, opt)
    tx = build(opt, rules, layer_decay=_get(cfg, "layer_decay", 0.0) or None, num_layers=num_layers,
               layer_pattern=layer_pattern, clip_norm=_get(cfg, "clip_norm", 0.0) or None, strict=strict)
    return tx, sched

"""Regularisers against forgetting: L2-SP (an optax transformation), BSS and distillation (loss terms).

**L2-SP** (Li et al. 2018) pulls the weights toward the pretrained point
``theta0`` instead of toward zero, and decays the new leaves (a fresh head)
plainly. For parameters ``theta`` it adds to the loss::

    Omega(theta) = alpha / 2 * sum_{p pretrained} ||theta_p - theta0_p||^2 + beta / 2 * sum_{p new} ||theta_p||^2

:func:`l2_sp` adds its gradient to the incoming one, ``g_p + alpha (theta_p -
theta0_p)`` (``g_p + beta theta_p`` on new leaves), and keeps ``theta0`` in its
state (taken at ``init``, so it is checkpointed and resumed with the optimizer).
Put it before the optimizer, ``optim.build(optax.chain(l2_sp(0.01, new="classifier/**"),
optax.adam(lr)), rules)``: inside ``build`` it sees -- and stores ``theta0``
for -- the trainable leaves only, and frozen leaves stay bit-identical.

**Loss terms.** A term is ``term(outputs, batch) -> array``: a scalar for the
batch, or one value per example (``[B]``). :func:`add_terms` adds weighted terms
to a ``loss_fn(outputs, batch) -> (losses, weights)``: each term is broadcast
onto ``losses``, so with the step's weighted mean ``sum((l + w R) m) / sum(m)
= mean(l) + w * mean(R)``, the term's (masked) mean. Give the combined loss to
``make_train_step`` and the plain one to ``make_eval_step``; nothing in the
step changes. With ``micro_batches=k`` a batch-level term is computed per
micro-batch and averaged by weight (spectral terms are not additive).

* :func:`bss` -- Batch Spectral Shrinkage (Chen et al. 2019): ``sum_{i<=k}
  sigma_{-i}^2``, the ``k`` smallest singular values of the batch's feature
  matrix (padding rows zeroed), pushing down the spectral components that
  transfer badly.
* :func:`distillation` -- LwF / feature distillation against the pretrained
  model: per example, ``T^2 KL(softmax(t/T) || softmax(s/T))`` on logits or the
  mean squared difference of (pooled) features, where the teacher's outputs come
  from :func:`with_teacher` under ``outputs["teacher"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxfer import masks, tree
from jaxfer.models.heads import pool
from jaxfer.train.losses import LossFn

PyTree = Any
Term = Callable[[Mapping[str, Any], Mapping[str, Any]], jax.Array]
TEACHER = "teacher"  # top-level params key of a frozen teacher copy, and outputs key of its outputs


# ======================================================================= L2-SP
class L2SPState(NamedTuple):
    theta0: PyTree  # the pretrained leaves (new leaves: None)


def _new_mask(new: masks.MaskLike | None) -> masks.Mask:
    return masks.nothing() if new is None else masks.as_mask(new)


def l2_sp(alpha: float, beta: float = 0.0, *, new: masks.MaskLike | None = None,
          theta0: PyTree | None = None) -> optax.GradientTransformation:
    """``g_p <- g_p + alpha (theta_p - theta0_p)``; ``g_p + beta theta_p`` on leaves ``new`` selects.

    ``theta0``: the pretrained params (any tree holding at least the leaves
    ``init`` sees); ``None`` takes the params ``init`` is called with.
    ``update`` needs ``params``. Paths in ``new`` are checked by the caller
    (``init`` may see only the trainable part of the tree).
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"l2_sp needs alpha, beta >= 0, got {alpha}, {beta}")
    is_new = _new_mask(new)

    def init(params):
        source = tree.flatten(theta0) if theta0 is not None else None

        def start(path, x):
            if is_new.selects(path):
                return None
            if source is not None and path not in source:
                raise KeyError(f"l2_sp: theta0 has no leaf {path!r}")
            return jnp.copy(source[path] if source is not None else x)

        return L2SPState(tree.map_with_path(start, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("l2_sp needs params: call tx.update(grads, opt_state, params)")
        anchor = tree.flatten(state.theta0)

        def pull(path, g, p):
            if path in anchor:
                return g + alpha * (p - anchor[path]).astype(g.dtype)
            return g + beta * p.astype(g.dtype) if beta else g

        return tree.map_with_path(pull, updates, params), state

    return optax.GradientTransformation(init, update)


def l2_sp_penalty(params: PyTree, theta0: PyTree, alpha: float, beta: float = 0.0, *,
                  new: masks.MaskLike | None = None) -> jax.Array:
    """``Omega(theta)`` of the module doc (the loss whose gradient :func:`l2_sp` adds)."""
    is_new, anchor = _new_mask(new), tree.flatten(theta0)
    total = jnp.zeros((), jnp.float32)
    for path, p in tree.flatten(params).items():
        if is_new.selects(path):
            total += 0.5 * beta * jnp.sum(jnp.square(p))
        else:
            total += 0.5 * alpha * jnp.sum(jnp.square(p - anchor[path]))
    return total


# ================================================================= loss terms
def add_terms(loss_fn: LossFn, *terms: tuple[float, Term]) -> LossFn:
    """``loss_fn`` with ``weight * term(outputs, batch)`` added to every loss (see the module doc)."""
    for w, t in terms:
        if not callable(t) or w < 0:
            raise ValueError(f"terms are (weight >= 0, term(outputs, batch)) pairs, got {(w, t)!r}")

    def combined(outputs, batch):
        losses, weights = loss_fn(outputs, batch)
        for w, term in terms:
            r = jnp.asarray(term(outputs, batch), losses.dtype)
            if r.ndim > losses.ndim or r.shape != losses.shape[:r.ndim]:
                raise ValueError(f"a loss term of shape {r.shape} does not fit losses of shape {losses.shape}")
            losses = losses + w * r.reshape(r.shape + (1,) * (losses.ndim - r.ndim))
        return losses, weights

    return combined


def features(outputs: Mapping[str, Any], batch: Mapping[str, Any], pooling: str = "mean") -> jax.Array:
    """The pooled backbone features a head sees (``heads.pool`` with the batch's attention mask)."""
    return pool(outputs, pooling, batch.get("attention_mask"))


def batch_spectral_shrinkage(f: jax.Array, k: int = 1, mask: jax.Array | None = None) -> jax.Array:
    """``sum`` of the squared ``k`` smallest singular values of ``f`` ``[B, d]`` (rows with mask 0 zeroed)."""
    f = f.reshape(f.shape[0], -1).astype(jnp.float32)
    if mask is not None:
        f = f * jnp.asarray(mask, f.dtype)[:, None]
    s = jnp.linalg.svd(f, compute_uv=False)  # descending
    if not 1 <= k <= s.shape[0]:
        raise ValueError(f"bss k={k} must be in [1, {s.shape[0]}] (min of batch size and feature size)")
    return jnp.sum(jnp.square(s[-k:]))


def bss(k: int = 1, pooling: str = "mean") -> Term:
    """Batch Spectral Shrinkage on the pooled features (a batch-level term)."""
    return lambda outputs, batch: batch_spectral_shrinkage(features(outputs, batch, pooling), k, batch.get("mask"))


def distillation(key: str = "features", *, kind: str = "mse", temperature: float = 1.0,
                 pooling: str = "mean") -> Term:
    """Per-example distance of the student's ``outputs[key]`` to the teacher's ``outputs["teacher"][key]``.

    ``key="features"`` compares pooled features (``pooling``); any other key an
    output of that name (``"logits"`` for LwF with an old head). ``kind="kl"``:
    ``T^2 KL(softmax(t/T) || softmax(s/T))`` over the last axis; ``"mse"``: mean
    squared difference over the trailing axes.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"distillation kind must be 'kl' or 'mse', got {kind!r}")

    def get(outputs, batch):
        return features(outputs, batch, pooling) if key == "features" else outputs[key]

    def term(outputs, batch):
        if TEACHER not in outputs:
            raise KeyError("distillation needs the teacher's outputs: wrap the apply_fn with with_teacher(...)")
        s, t = get(outputs, batch), jax.lax.stop_gradient(get(outputs[TEACHER], batch))
        if kind == "mse":
            return jnp.mean(jnp.square(s - t).reshape(s.shape[0], -1), axis=-1)
        log_p = jax.nn.log_softmax(s / temperature, axis=-1)
        q = jax.nn.softmax(t / temperature, axis=-1)
        kl = jnp.sum(q * (jnp.log(jnp.maximum(q, 1e-30)) - log_p), axis=-1)
        return temperature ** 2 * kl.reshape(kl.shape[0], -1).mean(-1)

    return term


def add_teacher(params: PyTree) -> dict:
    """``params`` plus a copy of them under ``params["teacher"]`` (freeze it: ``("teacher/**", None)``)."""
    if TEACHER in params:
        raise ValueError("params already hold a teacher")
    return {**params, TEACHER: jax.tree_util.tree_map(jnp.copy, params)}


def with_teacher(apply_fn, teacher_apply_fn=None, teacher_params: Callable[[PyTree], PyTree] | None = None):
    """``apply_fn`` whose outputs also hold ``outputs["teacher"]``: the teacher in inference mode, no gradient.

    ``teacher_params(params)`` picks the teacher's params (default
    ``params["teacher"]``, from :func:`add_teacher`; for LoRA the base itself,
    ``lora.base_params``, costs no copy); ``teacher_apply_fn`` runs them
    (default ``apply_fn``). The student gets ``params`` without ``"teacher"``.
    """
    teacher_apply_fn = teacher_apply_fn or apply_fn
    teacher_params = teacher_params or (lambda params: params[TEACHER])

    def distill_apply_fn(variables, batch, *, train, rng=None):
        params = variables["params"]
        student = {**variables, "params": {k: v for k, v in params.items() if k != TEACHER}}
        outputs, new_state = apply_fn(student, batch, train=train, rng=rng)
        if train:  # evaluation needs no teacher
            teacher = jax.lax.stop_gradient(teacher_params(params))
            t_out, _ = teacher_apply_fn({**variables, "params": teacher}, batch, train=False, rng=None)
            outputs = {**outputs, TEACHER: jax.lax.stop_gradient(t_out)}
        return outputs, new_state

    return distill_apply_fn

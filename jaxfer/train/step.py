"""Step builders: ``make_train_step`` and ``make_eval_step``, plus the Linen adapter.

A model enters the step as an ``apply_fn``::

    apply_fn(variables, batch, *, train, rng) -> (outputs, new_model_state)

where ``variables = {"params": ..., **state.model_state}``, ``outputs`` is a
dict (``{"logits": ...}`` ...) and ``new_model_state`` holds the non-parameter
collections after the call (``batch_stats`` ...). :func:`linen_apply` builds
one for any Linen module and :func:`model_apply` for a loaded jaxfer ``Model``.
A loss enters as ``loss_fn(outputs, batch) -> (losses, weights)`` (see
:mod:`jaxfer.train.losses`).

What ``trainable`` (a bool tree shaped like the params) does in the train step:

* only the trainable partition is differentiated, so XLA never builds the
  backward pass of a frozen bottom (see ``benchmarks/frozen_step.py``);
* frozen leaves come out of the step bit-identical (they are passed through,
  never touched by an update);
* frozen means inference mode: every ``flax.linen.BatchNorm`` whose own
  scale/bias are frozen runs with its running statistics during training (and
  those statistics stay fixed), and every ``flax.linen.Dropout`` inside a module
  whose parameters are all frozen is off (``frozen_dropout=False`` keeps it).

The non-finite guard (``skip_nonfinite=True``, the default): when the loss, a
gradient, an update, the new params, the new optimizer state (e.g. Adam's second
moment, which overflows to inf while the gradient is finite) or the new model
state (batch statistics) is not finite,
or when the gradients' squared global norm overflows (where ``g**2`` may),
the step keeps the old params, optimizer state and model state (bit-identical;
the batch is still consumed: ``step`` and ``rng`` advance) and reports
``metrics["nonfinite"] = 1``. :func:`jaxfer.train.loop.fit` stops the run after
too many of those in a row.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxfer import tree
from jaxfer.models.heads import train_kwarg
from jaxfer.train.losses import LossFn
from jaxfer.train.rng import DEFAULT_DROPOUT_RNG, DROPOUT_RNGS, dropout_key
from jaxfer.train.state import TrainState

PyTree = Any
ApplyFn = Callable[..., tuple[dict, dict]]
# what Hugging Face style backbones take; anything else in a batch (label, mask) is not a model input
DEFAULT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                      "pixel_values", "input_values")
_NOT_INPUTS = {"self", "train", "deterministic", "rngs", "mutable", "method"}


# ------------------------------------------------------------------ apply_fn
def _input_keys(module: nn.Module) -> tuple[str, ...]:
    """Batch keys a module's ``__call__`` accepts: its named parameters, plus the HF
    names when it also takes ``**kwargs`` (``TaskModel`` takes only ``**inputs``)."""
    params = inspect.signature(type(module).__call__).parameters.values()
    named = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in _NOT_INPUTS)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return named + tuple(k for k in DEFAULT_INPUT_KEYS if k not in named)
    return named


def linen_apply(module: nn.Module, input_keys: Sequence[str] | None = None) -> ApplyFn:
    """``apply_fn`` for a Linen module.

    Passes the batch entries named in ``input_keys`` (default: the parameters of
    ``module.__call__`` that the batch has, or the usual HF input names for a
    ``**inputs`` signature) as keywords, with ``train=``/``deterministic=``
    as the module takes it. In training it gives ``rngs={"dropout": rng}`` and
    makes every non-params collection of ``variables`` mutable; in evaluation
    the returned model state is the input one, unchanged. A module that returns
    an array rather than a dict is taken to return ``{"logits": array}``.
    """
    keys = tuple(input_keys) if input_keys is not None else _input_keys(module)

    def apply_fn(variables: Mapping[str, Any], batch: Mapping[str, Any], *, train: bool,
                 rng: jax.Array | None = None) -> tuple[dict, dict]:
        inputs = {k: batch[k] for k in keys if k in batch}
        state_collections = [c for c in variables if c != "params"]
        rngs = {"dropout": rng} if train and rng is not None else None
        kwargs = dict(inputs, **train_kwarg(module, train))
        if train and state_collections:
            outputs, new_state = module.apply(variables, rngs=rngs, mutable=state_collections, **kwargs)
            new_state = dict(new_state)
        else:
            outputs = module.apply(variables, rngs=rngs, **kwargs)
            new_state = {c: variables[c] for c in state_collections}
        if not isinstance(outputs, Mapping):
            outputs = {"logits": outputs}
        return dict(outputs), new_state

    return apply_fn


def model_apply(model: Any, input_keys: Sequence[str] | None = None) -> ApplyFn:
    """``apply_fn`` for a loaded :class:`jaxfer.weights.load.Model` (its ``module``)."""
    return linen_apply(model.module, input_keys)


# ------------------------------------------------- frozen means inference mode
def module_status(trainable: PyTree, adapted: Sequence[str] = ()) -> dict[str, bool]:
    """``{module path: all its parameters frozen}`` for every module that holds parameters,
    at any depth (``"bert/encoder/layer/3"`` as well as ``".../attention/self/query"``;
    ``""`` is the root).

    ``adapted`` names leaves or modules that train through parameters kept
    elsewhere in the tree (the kernels LoRA adapts, the modules adapters follow):
    they, and the modules around them, count as training.
    """
    status: dict[str, bool] = {}

    def mark(parts: list[str], frozen: bool) -> None:
        for n in range(len(parts) + 1):
            module = tree.SEP.join(parts[:n])
            status[module] = status.get(module, True) and frozen

    for path, is_trainable in tree.flatten(trainable).items():
        mark(path.split(tree.SEP)[:-1], not bool(is_trainable))
    for path in adapted:
        mark(path.split(tree.SEP), False)
    return status


def _owner_frozen(status: Mapping[str, bool], path: tuple[str, ...]) -> bool:
    """Is the nearest enclosing module that holds parameters all frozen?"""
    for n in range(len(path) - 1, -1, -1):
        frozen = status.get(tree.SEP.join(path[:n]))
        if frozen is not None:
            return frozen
    return False


def call_with_flag(module, args, kwargs, next_fun, name: str, value: bool, positional: int):
    """Call ``next_fun`` with the flag ``name`` forced to ``value``: as a call argument
    when the module takes it per call, else on this bound instance for the call only
    (flax refuses a flag given at construction and again in the call)."""
    if name in kwargs or len(args) > positional or getattr(module, name) is None:
        return next_fun(*args[:positional], **{**kwargs, name: value})
    old = getattr(module, name)
    object.__setattr__(module, name, value)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, name, old)


@contextlib.contextmanager
def frozen_inference_scope(status: Mapping[str, bool], *, batch_norm: bool = True, dropout: bool = True):
    """Run the frozen modules of a training call in inference mode.

    ``status`` is :func:`module_status` of the trainable mask. Inside the scope

    * every ``nn.BatchNorm`` whose own scale/bias are frozen (``batch_norm``) uses,
      and leaves untouched, its running statistics: a frozen batch norm that kept
      normalising with batch statistics would shift the features its frozen
      neighbours were trained on (the Keras ``BatchNormalization`` lesson);
    * every ``nn.Dropout`` whose nearest enclosing module with parameters is all
      frozen (``dropout``) is the identity.

    So a frozen part of the network is what Keras calls ``base(x, training=False)``:
    a pure function of its input, the same in training and in evaluation, whose
    output can be computed once and cached (:mod:`jaxfer.transfer.prefix`).
    Dropout of trainable modules, and of the head, is untouched.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if batch_norm and isinstance(module, nn.BatchNorm) and status.get(tree.SEP.join(map(str, module.path))):
            return call_with_flag(module, args, kwargs, next_fun, "use_running_average", True, 1)
        if dropout and isinstance(module, nn.Dropout) and _owner_frozen(status, tuple(map(str, module.path))):
            return call_with_flag(module, args, kwargs, next_fun, "deterministic", True, 1)
        return next_fun(*args, **kwargs)

    if not any(status.values()) or not (batch_norm or dropout):
        yield
        return
    with nn.intercept_methods(interceptor):
        yield


def frozen_batch_norm_scope(frozen_modules: frozenset[str]):
    """:func:`frozen_inference_scope` for batch norm only, given the frozen module paths."""
    return frozen_inference_scope({m: True for m in frozen_modules}, dropout=False)


# --------------------------------------------------------------- train step
def _broadcast_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask, like.dtype)
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _batch_size(batch: Mapping[str, Any]) -> int:
    sizes = {jnp.shape(v)[0] for v in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch entries disagree on the leading (batch) size: {sorted(sizes)}")
    return sizes.pop()


def _weighted_loss(loss_fn: LossFn, outputs, batch) -> tuple[jax.Array, jax.Array]:
    """``(sum(losses * weights), sum(weights))`` with weights times ``batch["mask"]``."""
    losses, weights = loss_fn(outputs, batch)
    weights = jnp.asarray(weights, jnp.float32)
    if "mask" in batch:
        weights = weights * _broadcast_mask(batch["mask"], weights)
    return jnp.sum(losses * weights), jnp.sum(weights)


def _split_micro_batches(batch: Mapping[str, Any], k: int) -> dict:
    size = _batch_size(batch)
    if size % k:
        raise ValueError(f"batch size {size} is not divisible by micro_batches={k}")
    return jax.tree_util.tree_map(lambda x: jnp.reshape(x, (k, size // k) + jnp.shape(x)[1:]), dict(batch))


def _sync_model_state(model_state: PyTree, frozen_modules: frozenset[str], axis_name: str) -> PyTree:
    """Average float collections (batch statistics) over the replicas, so they stay equal.

    Frozen modules are skipped: their statistics are already equal, and a mean of
    equal floats need not be bit-identical to them.
    """

    def sync(path, x):
        module = tree.SEP.join(path.split(tree.SEP)[1:-1])  # drop collection and variable name
        if module in frozen_modules or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jax.lax.pmean(x, axis_name)

    return tree.map_with_path(sync, model_state)


def _all_finite(values: PyTree) -> jax.Array:
    """True when every float leaf of ``values`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(values)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _where(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` if ``ok`` else ``old``, as one ``lax.cond`` over the trees.

    Not a ``jnp.where`` per leaf: XLA:CPU fuses those selects with the
    finiteness reductions they depend on, and a 6-layer BERT step then took
    ~60 s to compile instead of ~5 s (same step time)."""
    return jax.lax.cond(ok, lambda: new, lambda: old)


def _cast_floats(values: PyTree, dtype: Any) -> PyTree:
    """Floating leaves of ``values`` as ``dtype`` (others as they are)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, values)


def _compute_in(dtype: Any, params: PyTree, batch: Mapping[str, Any]) -> tuple[PyTree, dict]:
    """Params and the model's float inputs (:data:`DEFAULT_INPUT_KEYS`) cast to the compute dtype."""
    if dtype is None:
        return params, batch
    return _cast_floats(params, dtype), {k: _cast_floats(v, dtype) if k in DEFAULT_INPUT_KEYS else v
                                         for k, v in batch.items()}


def _all_true(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda _: True, params)


def make_train_step(apply_fn: ApplyFn, loss_fn: LossFn, tx: optax.GradientTransformation,
                    trainable: PyTree | None = None, *, micro_batches: int = 1,
                    lr_schedule: optax.Schedule | None = None, axis_name: str | None = None,
                    jit: bool = True, donate: bool = True, frozen_batch_norm: bool = True,
                    frozen_dropout: bool = True, adapted: Sequence[str] = (), skip_nonfinite: bool = True,
                    compute_dtype: Any = None, dropout_rng: str = DEFAULT_DROPOUT_RNG,
                    state_sharding: Any = None, batch_sharding: Any = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``step(state, batch) -> (state, metrics)``.

    Args:
      apply_fn: ``apply_fn(variables, batch, *, train, rng) -> (outputs, model_state)``.
      loss_fn: ``loss_fn(outputs, batch) -> (losses, weights)``; the step
        minimises ``sum(losses * weights * mask) / sum(weights * mask)``.
      tx: the optimizer, built over the *full* params tree (frozen labels mapped
        to ``optax.set_to_zero()``, which holds no state).
      trainable: bool tree shaped like ``state.params`` (``None``: all trainable).
      micro_batches: gradient accumulation inside the step: the batch is cut into
        this many equal chunks, scanned over, and the summed gradient is divided
        by the total weight, so the result equals the one-batch step.
      lr_schedule: reported as ``metrics["lr"] = lr_schedule(state.step)``.
      axis_name: for ``jax.pmap(step, axis_name=...)``: loss sums, weights,
        gradients and metrics are summed over the axis before dividing, so the
        replicas take the global-batch step; float model state (batch
        statistics) is averaged over the axis. The step is then not jitted.
      jit / donate: ``jax.jit`` the step, donating the state's buffers.
      frozen_batch_norm: run batch norms with frozen scale/bias on their running
        statistics (and leave those fixed).
      frozen_dropout: switch off the dropout of modules whose parameters are all
        frozen, so the frozen part runs as in inference (see
        :func:`frozen_inference_scope`); ``False`` keeps it random, as before.
      adapted: paths of frozen leaves or modules that train through parameters
        kept elsewhere (LoRA's kernels, adapters' modules): not inference mode.
      skip_nonfinite: the non-finite guard (module docstring); ``False`` applies
        every update, finite or not (``metrics["nonfinite"]`` is still reported).
      compute_dtype: e.g. ``jnp.bfloat16``: the forward and backward pass run on
        params and float model inputs cast to it (mixed precision), while the
        params, their gradients and the optimizer state stay in their own dtype
        (float32 master weights); outputs are cast back to float32 for the loss.
      dropout_rng: ``"hash"`` (the default): the per-step dropout key becomes a
        :data:`jaxfer.train.rng.HASH_IMPL` key with the same data, whose bits are a
        counter hash (about 10% off a MiniLM-size CPU step); ``"threefry"``: JAX's
        default generator draws the masks. ``state.rng`` stays a threefry key either way.
      state_sharding / batch_sharding: ``in_shardings``/``out_shardings`` for ``jax.jit``.

    Gradients are taken only for the trainable partition. The optimizer still
    sees full trees: ``tx.update(grads, opt_state, params)`` gets zeros at the
    frozen leaves, so optimizers built over the whole tree keep working; the
    zeros are never read by ``set_to_zero`` and XLA drops them. The updates are
    then applied to the trainable leaves only, and the frozen leaves are the
    input arrays themselves.

    Metrics: ``loss`` (weighted mean), ``grad_norm`` (global norm of the
    trainable gradients), ``examples`` (sum of ``batch["mask"]``, or the batch
    size), ``nonfinite`` (1.0 when the guard found a non-finite value, else 0.0)
    and ``lr`` when ``lr_schedule`` is given.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if dropout_rng not in DROPOUT_RNGS:
        raise ValueError(f"dropout_rng must be one of {DROPOUT_RNGS}, got {dropout_rng!r}")
    mask_tree = None if trainable is None else jax.tree_util.tree_map(bool, trainable)
    status = module_status(mask_tree, adapted) if mask_tree is not None else {}
    frozen_bn = frozenset(m for m, f in status.items() if f) if frozen_batch_norm else frozenset()

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        mask = _all_true(state.params) if mask_tree is None else mask_tree
        if jax.tree_util.tree_structure(mask) != jax.tree_util.tree_structure(state.params):
            raise ValueError("`trainable` must have the structure of state.params; differing paths: "
                             f"{sorted(set(tree.paths(mask)) ^ set(tree.paths(state.params)))[:10]}")
        trainable_params, frozen_params = tree.partition(state.params, mask)
        rng, step_rng = jax.random.split(state.rng)
        if dropout_rng == "hash":
            step_rng = dropout_key(step_rng)

        def summed_loss(trainable_params, model_state, chunk, rng):
            params, inputs = _compute_in(compute_dtype, tree.merge(trainable_params, frozen_params), chunk)
            variables = {"params": params, **model_state}
            with frozen_inference_scope(status, batch_norm=frozen_batch_norm, dropout=frozen_dropout):
                outputs, new_model_state = apply_fn(variables, inputs, train=True, rng=rng)
            if compute_dtype is not None:
                outputs = _cast_floats(outputs, jnp.float32)
            loss_sum, weight_sum = _weighted_loss(loss_fn, outputs, chunk)
            return loss_sum, (weight_sum, {**model_state, **new_model_state})

        def value_and_grad(trainable_params, model_state, chunk, rng):
            (loss_sum, (weight_sum, new_model_state)), grads = jax.value_and_grad(summed_loss, has_aux=True)(
                trainable_params, model_state, chunk, rng)
            return grads, loss_sum, weight_sum, new_model_state

        if micro_batches == 1:
            grads, loss_sum, weight_sum, model_state = value_and_grad(
                trainable_params, state.model_state, batch, step_rng)
        else:
            chunks = _split_micro_batches(batch, micro_batches)
            rngs = jax.random.split(step_rng, micro_batches)

            def accumulate(carry, xs):
                grads, loss_sum, weight_sum, model_state = carry
                chunk, chunk_rng = xs
                g, l, w, model_state = value_and_grad(trainable_params, model_state, chunk, chunk_rng)
                grads = jax.tree_util.tree_map(jnp.add, grads, g)
                return (grads, loss_sum + l, weight_sum + w, model_state), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable_params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), state.model_state)
            (grads, loss_sum, weight_sum, model_state), _ = jax.lax.scan(accumulate, init, (chunks, rngs))

        examples = jnp.sum(jnp.asarray(batch["mask"], jnp.float32)) if "mask" in batch else \
            jnp.asarray(_batch_size(batch), jnp.float32)
        if axis_name is not None:
            grads, loss_sum, weight_sum, examples = jax.lax.psum((grads, loss_sum, weight_sum, examples), axis_name)
            model_state = _sync_model_state(model_state, frozen_bn, axis_name)
        # a batch of padding only has weight 0 and gradient 0: keep it a no-op, not 0/0
        denom = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
        grads = jax.tree_util.tree_map(lambda g: g / denom.astype(g.dtype), grads)

        full_grads = tree.merge(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen_params))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        trainable_updates, _ = tree.partition(updates, mask)
        new_trainable = optax.apply_updates(trainable_params, trainable_updates)
        # adam's second moment overflows (g**2 = inf) while g and the update stay finite
        # the gradients are checked through their squared norm (which the metrics need anyway;
        # it overflows exactly when some g**2 may, i.e. when Adam's second moment would), the
        # updates through the new params (old + update is finite only when the update is)
        grad_sq = optax.tree.norm(grads, squared=True)
        finite = jnp.isfinite(grad_sq) & _all_finite((loss_sum, new_trainable, opt_state, model_state))
        if skip_nonfinite:  # keep the old values; frozen leaves are untouched either way
            new_trainable, opt_state, model_state = _where(
                finite, (new_trainable, opt_state, model_state),
                (trainable_params, state.opt_state, state.model_state))
        params = tree.merge(new_trainable, frozen_params)

        metrics = {"loss": loss_sum / denom, "grad_norm": jnp.sqrt(grad_sq), "examples": examples,
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                                  model_state=model_state)
        return new_state, metrics

    if axis_name is not None or not jit:
        return step
    shardings = {}
    if state_sharding is not None or batch_sharding is not None:
        shardings["in_shardings"] = (state_sharding, batch_sharding)
    if state_sharding is not None:
        shardings["out_shardings"] = (state_sharding, None)
    return jax.jit(step, donate_argnums=(0,) if donate else (), **shardings)


# ---------------------------------------------------------------- eval step
def make_eval_step(apply_fn: ApplyFn, loss_fn: LossFn, *, output_keys: Sequence[str] = ("logits",),
                   label_key: str | Sequence[str] = "label", jit: bool = True, axis_name: str | None = None,
                   compute_dtype: Any = None) -> Callable[[TrainState, dict], dict]:
    """Build ``eval_step(state, batch) -> dict`` of per-example arrays.

    Returns ``loss`` (``[B]``: the sum over trailing dims of ``losses * weights``,
    so token losses add up per sequence), ``weight`` (``[B]``, the matching sum
    of weights), each of ``output_keys``, the labels under ``label_key`` (one
    key or several; those the batch has) and ``mask`` (``[B]``, ones when the batch has none).
    A dataset's loss is ``sum(loss) / sum(weight)`` over its rows; padding rows
    (mask 0) have weight 0 and are dropped by the caller on the host.

    Runs with ``train=False``, ``state.model_state`` and no rng (``compute_dtype``:
    as in :func:`make_train_step`). With ``axis_name`` (pmap) the step is not
    jitted; outputs stay per device.
    """

    def eval_step(state: TrainState, batch: dict) -> dict:
        params, inputs = _compute_in(compute_dtype, state.params, batch)
        outputs, _ = apply_fn({"params": params, **state.model_state}, inputs, train=False, rng=None)
        if compute_dtype is not None:
            outputs = _cast_floats(outputs, jnp.float32)
        losses, weights = loss_fn(outputs, batch)
        size = jnp.shape(losses)[0]
        mask = jnp.asarray(batch["mask"], jnp.float32) if "mask" in batch else jnp.ones((size,), jnp.float32)
        weights = jnp.asarray(weights, jnp.float32) * _broadcast_mask(mask, jnp.asarray(weights, jnp.float32))
        trailing = tuple(range(1, jnp.ndim(losses)))
        result = {"loss": jnp.sum(losses * weights, axis=trailing), "weight": jnp.sum(weights, axis=trailing),
                  "mask": mask}
        for key in output_keys:
            result[key] = outputs[key]
        for key in (label_key,) if isinstance(label_key, str) else label_key:
            if key in batch:
                result[key] = batch[key]
        return result

    if axis_name is not None or not jit:
        return eval_step
    return jax.jit(eval_step)

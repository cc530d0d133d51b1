"""The training state: one pytree, so it can be jitted, donated, sharded and saved."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Attributes:
      step: number of optimizer updates applied so far (int32 scalar).
      params: the full parameter tree (frozen and trainable leaves alike).
      opt_state: the optimizer state; frozen subtrees hold none (see ``jaxfer.optim``).
      rng: a PRNG key, split once per step for dropout and the like.
      model_state: non-parameter collections such as ``{"batch_stats": ...}``
        (empty dict when the model has none).
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    model_state: PyTree = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array | int = 0,
               model_state: PyTree | None = None, *, copy: bool = True) -> "TrainState":
        """A step-0 state; ``tx.init(params)`` builds the optimizer state.

        The train step donates its state, so the arrays a state holds are
        consumed by the first step. ``copy=True`` (the default) gives the state
        its own copies, so the arrays passed in (``model.params``, the pretrained
        weights) stay usable; pass ``copy=False`` when memory is tight and the
        inputs are not needed again.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        model_state = {} if model_state is None else model_state
        if copy:
            params, model_state = jax.tree_util.tree_map(jnp.copy, (params, model_state))
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            model_state=model_state,
        )


def cast_frozen(params: PyTree, trainable: PyTree, dtype: Any = jnp.bfloat16) -> PyTree:
    """``params`` with its frozen floating leaves stored as ``dtype`` (trainable ones unchanged).

    The train step passes frozen leaves through untouched, so they stay in
    ``dtype`` (half the memory of float32 for ``bfloat16``); the model computes
    with them in the dtype of its inputs (float32 unless a ``compute_dtype`` is set).
    """
    return jax.tree_util.tree_map(
        lambda x, t: x if t or not jnp.issubdtype(jnp.result_type(x), jnp.floating) else jnp.asarray(x, dtype),
        params, trainable)

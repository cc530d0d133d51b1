"""Layer norm and GELU written so that XLA compiles them into few, cheap loops.

The same math as ``flax.linen.LayerNorm`` and ``nn.gelu(approximate=False)``; what
changes is the program XLA sees. In a BERT training step on XLA:CPU much of the
time outside the matmuls goes to these two:

* **layer norm** -- autodiff of ``(x - mean) * rsqrt(var + eps) * scale + bias``
  keeps several full-size intermediates and XLA:CPU materialises the broadcast
  ``scale`` for the backward pass. :func:`layer_norm` has a hand-written VJP
  that saves ``(x, mean, rstd)`` and computes, with ``x^ = (x - mean) * rstd``
  and ``g = dy * scale``::

      dx = rstd * (g - mean(g) - x^ * mean(g * x^)),  dscale = sum(dy * x^),  dbias = sum(dy)

  (means over the normalised axis, sums over the others). Statistics are
  float32 whatever the input dtype (bfloat16 compute); the variance is
  two-pass ``mean((x - mean)^2)``, as torch's.
* **GELU** -- ``jax.nn.gelu(approximate=False)`` is ``x/2 * erfc(-x/sqrt 2)``, and
  XLA's ``erfc`` is a piecewise rational with an ``exp``, several times the cost
  of its ``erf``. :func:`gelu` is torch's formula ``x/2 * (1 + erf(x/sqrt 2))``
  (identical to float32 rounding) with the VJP
  ``dy * (Phi(x) + x * phi(x))`` from the saved input, so the forward pass writes
  one array, not two.

Dropout stays flax's ``nn.Dropout``; its bits are cheaper with
``make_train_step(dropout_rng="hash")`` (:mod:`jaxfer.train.rng`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = np.float32(1 / math.sqrt(2))
_INV_SQRT_2PI = np.float32(1 / math.sqrt(2 * math.pi))


# ---------------------------------------------------------------- layer norm
def _ln_stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    x32 = x.astype(jnp.float32)
    inv_n = np.float32(1 / x.shape[-1])  # sum * 1/n, not jnp.mean: jax2onnx maps jnp.mean to an opset-18 ReduceMean
    mean = jnp.sum(x32, axis=-1, keepdims=True) * inv_n
    var = jnp.sum(jnp.square(x32 - mean), axis=-1, keepdims=True) * inv_n
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (see module doc)."""
    mean, rstd = _ln_stats(x, eps)
    return ((x.astype(jnp.float32) - mean) * rstd * scale + bias).astype(x.dtype)


def _ln_fwd(x, scale, bias, eps):
    mean, rstd = _ln_stats(x, eps)
    y = ((x.astype(jnp.float32) - mean) * rstd * scale + bias).astype(x.dtype)
    return y, (x, mean, rstd, scale, bias)


def _ln_bwd(eps, res, dy):
    x, mean, rstd, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    axes = tuple(range(x.ndim - 1))
    dscale = jnp.sum(dy32 * xhat, axis=axes).astype(scale.dtype)
    dbias = jnp.sum(dy32, axis=axes).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_ln_fwd, _ln_bwd)


class LayerNorm(nn.Module):
    """``flax.linen.LayerNorm`` over the last axis (params ``scale``, ``bias``) on :func:`layer_norm`."""

    epsilon: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return layer_norm(x, scale, bias, self.epsilon)


# ---------------------------------------------------------------------- GELU
@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))``, torch's formula (see module doc)."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)
    return ((dy.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)

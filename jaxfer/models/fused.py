"""Layer norm, GELU and the dense layer's backward pass, written for the program XLA sees.

The same math as ``flax.linen.LayerNorm``, ``nn.gelu(approximate=False)`` and
``nn.Dense``; what changes is the program XLA compiles. In a BERT training step
on XLA:CPU much of the time outside the matmuls goes to these:

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
* **dense** -- for ``y = x W`` (``x (N, n_in)`` with ``N`` the flattened rows) JAX's
  VJP computes ``dW^T = dy^T x`` and then transposes it; XLA:CPU turns that into a
  product whose operands are both copied transposed, each copy recomputing the
  elementwise work that produced its operand (layer norm, dropout mask, GELU), and
  runs it outside YNNPACK. :func:`linear`'s VJP states the products directly::

      dx = dy W^T,   dW = x^T dy        if n_in <= n_out
                     dW = (dy^T x)^T    otherwise

  so XLA copies at most one operand transposed, the narrower of ``x`` and ``dy``
  (``N x min(n_in, n_out)``), and reads the other where it lies. Use it through
  ``nn.Dense(dot_general=dense_dot_general)`` (``models.common.dense`` does): the
  params and the forward pass are ``nn.Dense``'s, bit for bit, the gradients the
  same products up to float rounding. A MiniLM-size BERT training step
  (``benchmarks/steps.py``) went from ~540 to ~480 ms with it.

Dropout stays flax's ``nn.Dropout``; ``make_train_step`` draws its bits from a
counter hash by default (:mod:`jaxfer.train.rng`).
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


# ------------------------------------------------------------------- dense
def _apply(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """``x @ kernel``: ``x (..., n_in)``, ``kernel (n_in, n_out)`` (see module doc for its VJP)."""
    return _apply(x, kernel, precision)


def _linear_fwd(x, kernel, precision):
    return _apply(x, kernel, precision), (x, kernel)


def _linear_bwd(precision, res, dy):
    x, kernel = res
    rows = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
    if kernel.shape[0] > kernel.shape[1]:
        dkernel = jax.lax.dot_general(dy, x, ((rows, rows), ((), ())), precision=precision).T
    else:
        dkernel = jax.lax.dot_general(x, dy, ((rows, rows), ((), ())), precision=precision)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                      preferred_element_type: Any = None) -> jax.Array:
    """A ``dot_general`` for ``nn.Dense(dot_general=dense_dot_general)``: :func:`linear` for
    the contraction ``Dense`` does (last axis of the input with the kernel's first),
    ``jax.lax.dot_general`` for anything else."""
    dense = jnp.ndim(rhs) == 2 and dimension_numbers == (((jnp.ndim(lhs) - 1,), (0,)), ((), ()))
    if not dense or preferred_element_type is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return linear(lhs, rhs, precision)


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

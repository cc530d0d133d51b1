"""A cheap PRNG for dropout masks: threefry keys, hashed counters for the bits.

Dropout draws one 32-bit number per activation element every step (for a
MiniLM-size BERT at batch 32 x 64 tokens, ~19M numbers); with JAX's default
``threefry2x32`` that is ~8% of a CPU training step (``benchmarks/profile_step.py``).
:data:`HASH_IMPL` is a PRNG implementation (``jax.extend.random.define_prng_impl``)
whose keys are derived exactly as threefry's (``split`` / ``fold_in`` delegate to
threefry on the 2-word key) but whose bits are a counter hash, about a third of
threefry's cost in XLA:CPU::

    bits(k, i) = h(h(i xor k0) + k1),    i = 0, 1, ..., n - 1 (the flat element index)
    h = the "lowbias32" integer finaliser (uint32 arithmetic, wrapping):
        x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16

``h`` is a bijection of uint32 with good avalanche, so a key's stream never repeats
within 2**32 elements; two keys' streams are decorrelated by the two rounds and the
independent threefry-derived words ``k0, k1``. It is not a cryptographic generator
and makes no claim beyond what dropout needs (uniform, independent-looking bits;
tested in ``tests/test_train_rng.py``). The bits are a pure function of the key and
the element's flat index in the whole array.

Use: :func:`dropout_key` turns a threefry key into a hash key with the same data,
which ``make_train_step`` does by default (``dropout_rng="hash"``; ``"threefry"``
turns it off) to the per-step key it passes as ``rngs={"dropout": ...}``;
``state.rng`` and checkpoints keep the threefry key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random

__all__ = ["DEFAULT_DROPOUT_RNG", "DROPOUT_RNGS", "HASH_IMPL", "dropout_key", "hash_bits"]

DROPOUT_RNGS = ("threefry", "hash")  # make_train_step(dropout_rng=...)
DEFAULT_DROPOUT_RNG = "hash"


def _lowbias32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """``shape`` unsigned ints of ``bit_width`` bits from a ``(2,)`` uint32 key (module docstring)."""
    n = math.prod(shape)
    words = 2 * n if bit_width == 64 else n
    if words >= 2 ** 32:
        raise ValueError(f"hash_bits draws at most 2**32 words per call; {shape} at {bit_width} bits needs {words}")
    k0, k1 = key_data[0], key_data[1]
    counter = jax.lax.iota(jnp.uint32, max(words, 1))[:words]
    bits = _lowbias32(_lowbias32(counter ^ k0) + k1)
    if bit_width == 64:
        pair = bits.reshape(n, 2).astype(jnp.uint64)
        return ((pair[:, 0] << 32) | pair[:, 1]).reshape(shape)
    if bit_width == 32:
        return bits.reshape(shape)
    dtype = {8: jnp.uint8, 16: jnp.uint16}[bit_width]
    return (bits >> (32 - bit_width)).astype(dtype).reshape(shape)


def _threefry(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data, impl="threefry2x32")


HASH_IMPL = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=lambda seed: jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
    split=lambda key, shape: jax.random.key_data(jax.random.split(_threefry(key), shape)),
    random_bits=hash_bits,
    fold_in=lambda key, data: jax.random.key_data(jax.random.fold_in(_threefry(key), data)),
    name="jaxfer_hash32",
    tag="jh",
)


def dropout_key(key: jax.Array) -> jax.Array:
    """The hash-bits key holding ``key``'s data (a typed or raw threefry key)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = jnp.asarray(data, jnp.uint32)
    if data.shape[-1:] != (2,):
        raise ValueError(f"dropout_key wants a threefry key (2 uint32 words), got key data of shape {data.shape}")
    return jax.random.wrap_key_data(data, impl=HASH_IMPL)


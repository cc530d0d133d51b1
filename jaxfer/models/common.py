"""What model families share: activations, config getter, layers with torch semantics.

A family file (``models/<family>.py``) keeps only what is its own: its Linen
modules (named so params land in the HF Flax layout), its ``KEY_MAP`` (a list of
:class:`~jaxfer.models.keymap.KeyRule`), ``convert``, ``dummy_inputs``, ``build``
and one ``registry.register`` line. Everything below is reused, never copied:

* :func:`activation` -- HF ``hidden_act`` names -> functions (one table, :data:`ACTIVATIONS`);
* :func:`config_dict` -- HF ``PretrainedConfig`` or dict -> plain dict with the
  family's defaults (a ``None`` value takes the default too);
* :func:`dense` -- ``nn.Dense`` with ``normal(std)`` kernel init (HF's ``initializer_range``) and
  :func:`~jaxfer.models.fused.dense_dot_general` (its VJP; see :mod:`jaxfer.models.fused`);
* :class:`SelfAttention` -- multi-head attention; the module's own name and its
  ``q``/``k``/``v`` submodule names are the caller's, so BERT's
  ``attention/self/{query,key,value}`` and ViT's ``attention/attention/{query,key,value}``
  are the same code;
* :func:`attend` -- the attention core every family calls (``softmax(q k^T * scale + bias) v``
  on split heads); :func:`padding_bias` and :func:`causal_bias` build its additive bias;
* key/value caches for generation: :func:`empty_cache`, and :func:`cache_write` puts
  new keys/values into a fixed-size layer cache ``{"key", "value"}`` at a traced index;
* :class:`LayerStack` -- the ``layer/<i>`` scope: layer ``i`` is ``make(i, name=str(i))``,
  every state is returned (embeddings output first); with ``caches``, layer ``i``
  also reads and returns its own cache;
* :class:`RMSNorm` -- T5's layer norm (scale only, no mean subtracted, param ``weight``);
* CNNs (torch semantics): :func:`torch_conv` (symmetric ``k // 2`` padding, not
  ``"SAME"``), :func:`torch_batch_norm` (``eps=1e-5``, flax ``momentum=0.9`` = torch's 0.1),
  :func:`torch_max_pool` (``-inf`` padding), :func:`torch_avg_pool` (``count_include_pad``),
  :func:`adaptive_avg_pool` (``nn.AdaptiveAvgPool2d``), :func:`to_nhwc` / :func:`to_nchw`, :func:`pair`;
* CNNs, TensorFlow semantics: :func:`same_conv` (``"SAME"``: the extra row/column of
  padding at the bottom/right), :func:`same_avg_pool` (padding not counted);
* :class:`DepthwiseConv` -- a depthwise conv (``groups == features``) as ``k*k``
  shifted multiply-adds, which XLA:CPU runs several times faster than a grouped
  convolution (the parameters of ``nn.Conv``'s, so key maps do not change);
* :func:`drop_path` (stochastic depth: whole residual branches dropped per example) and
  :class:`DropPath`, the same as a module: an ``nn.Dropout``, so everything that
  switches dropout off (frozen modules in training, AdaBN) switches it off too.

A family file, laid out::

    DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, hidden_act="gelu", ...)

    class Layer(nn.Module):                               # what is the family's own
        c: Mapping
        @nn.compact
        def __call__(self, x, deterministic):
            a = SelfAttention(self.c["num_attention_heads"], std, name="attention")(x, None, deterministic)
            return x + dense(self.c["hidden_size"], std, "output")(activation(self.c["hidden_act"])(a))

    KEY_MAP = [KeyRule(r"(.*)\\.weight", r"\\1/kernel", "linear", ndim=2), KeyRule(r"(.*)\\.bias", r"\\1/bias")]
    def convert(state_dict, config): return apply_key_map(KEY_MAP, state_dict)
    def build(config): return MyModel(config)             # MyModel reads config_dict(config, DEFAULTS)
    registry.register(registry.Family("my_type", build, convert, dummy_inputs, r"encoder/layer/(\\d+)/", ...))

Model code never imports :mod:`jaxfer.weights` (weights import models, not back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer.models.fused import LayerNorm, dense_dot_general, gelu

Activation = Callable[[jax.Array], jax.Array]

# HF ACT2FN names (transformers/activations.py) with the same math.
ACTIVATIONS: dict[str, Activation] = {
    "gelu": gelu,  # exact (erf) GELU with a fused backward
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": nn.leaky_relu,  # slope 0.01, as torch's default
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Activation:
    """The activation HF calls ``name``; an unknown name is an error listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


def config_dict(config: Any, defaults: Mapping[str, Any] | None = None) -> dict:
    """HF ``PretrainedConfig`` (``to_dict()``) or a mapping -> a new plain dict.

    Keys of ``defaults`` that are missing or ``None`` take the default; other keys
    pass through as they are.
    """
    c = dict(config) if isinstance(config, Mapping) else config.to_dict()
    defaults = defaults or {}
    return {**defaults, **{k: v for k, v in c.items() if v is not None or k not in defaults}}


def dense(features: int, std: float, name: str, use_bias: bool = True) -> nn.Dense:
    """``nn.Dense`` with a ``normal(std)`` kernel (HF's ``initializer_range``), zero bias and
    :func:`~jaxfer.models.fused.dense_dot_general` (the same product, a VJP XLA:CPU compiles better)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(std), name=name,
                    dot_general=dense_dot_general)


def padding_bias(attention_mask: jax.Array, dtype: Any) -> jax.Array:
    """``(B, S)`` mask (1 keep, 0 pad) -> additive bias ``(B, 1, 1, S)``: 0 or ``finfo.min``."""
    neg = jnp.finfo(dtype).min
    return jnp.where(jnp.asarray(attention_mask)[:, None, None, :] > 0, 0.0, neg).astype(dtype)


def causal_bias(key_mask: jax.Array, query_slots: jax.Array, dtype: Any) -> jax.Array:
    """Causal additive bias ``(B, 1, T, S)``: query ``t`` sees key slot ``s`` iff
    ``s <= query_slots[t]`` and ``key_mask[b, s]`` (1 keep, 0 pad).

    ``query_slots`` ``(T,)`` are the queries' own slots among the ``S`` keys (``arange(T)``
    without a cache; ``index + arange(T)`` when writing into a cache at ``index``).
    """
    key_mask = jnp.asarray(key_mask)
    s = key_mask.shape[-1]
    allowed = (jnp.arange(s)[None, :] <= jnp.asarray(query_slots)[:, None])[None] & (key_mask[:, None, :] > 0)
    return jnp.where(allowed[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
           scale: float | None = None, dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Attention on split heads: ``q (B, T, n, d)``, ``k, v (B, S, n, d)`` -> ``(B, T, n, d)``.

    ``softmax(q k^T * scale + bias) v`` per head, ``scale`` ``1 / sqrt(d)`` by default
    (T5 uses 1.0); ``bias`` broadcasts to the scores ``(B, n, T, S)`` (padding,
    causal and relative-position biases, summed by the caller). The softmax runs
    in float32; ``dropout`` (the caller's ``nn.Dropout`` with its ``deterministic``
    bound, or ``None``) acts on the probabilities. Every family's attention goes
    through here.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    if scale is None:
        scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
    elif scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``(B, T, n * d)`` -> ``(B, T, n, d)``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``(B, T, n, d)`` -> ``(B, T, n * d)``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def empty_cache(batch_size: int, length: int, num_heads: int, head_dim: int, dtype: Any = jnp.float32) -> dict:
    """One attention layer's key/value cache: ``{"key", "value"}``, zeros ``(B, length, n, d)``."""
    shape = (batch_size, length, num_heads, head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def cache_write(cache: Mapping[str, jax.Array], k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
    """Write ``k, v (B, T, n, d)`` into a layer cache at slots ``index .. index + T - 1``.

    Shapes never change (the cache is allocated for the whole generation), so a
    jitted decoding step compiles once; ``index`` may be traced. Returns the new
    cache; attention then runs over all its slots, with a bias hiding the slots
    not written yet (:func:`causal_bias`).
    """
    start = (0, index, 0, 0)
    return {"key": jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start),
            "value": jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)}


class SelfAttention(nn.Module):
    """Multi-head attention ``softmax(q k^T / sqrt(d) + bias) v``, heads concatenated.

    ``q, k, v = Dense_{names}(x)`` with ``D = x.shape[-1]`` features each (``context``,
    when given, feeds ``k`` and ``v``: cross-attention), split into ``num_heads``
    heads of ``d = D / num_heads`` and mixed by :func:`attend`. ``bias`` (or ``None``)
    is added to the scores ``(B, heads, T, S)`` and broadcasts (:func:`padding_bias`
    for padding masks). Dropout (``dropout_rate``) acts on the probabilities when
    not ``deterministic``. No output projection: families name and place that
    themselves. Returns ``(B, T, D)``.
    """

    num_heads: int
    std: float = 0.02
    dropout_rate: float = 0.0
    use_bias: bool = True
    names: tuple[str, str, str] = ("query", "key", "value")

    @nn.compact
    def __call__(self, x, bias=None, deterministic: bool = True, context=None):
        h = x.shape[-1]
        kv = x if context is None else context
        q, k, v = (split_heads(dense(h, self.std, name, self.use_bias)(inp), self.num_heads)
                   for name, inp in zip(self.names, (x, kv, kv)))
        dropout = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        return merge_heads(attend(q, k, v, bias, dropout=dropout))


class LayerStack(nn.Module):
    """A scope holding layers ``0 .. num_layers - 1`` in sequence; returns every state.

    ``make(i, name=str(i))`` builds layer ``i`` (called inside this scope, so its
    params live at ``<this scope>/<i>/...``); each layer takes the previous state
    and the extra ``*args, **kwargs`` given to the stack. Returns
    ``[x, layer_0(x), layer_1(...), ...]``.

    With ``caches`` (one per layer: key/value caches for generation), layer ``i``
    is called with ``cache=caches[i]`` and returns ``(state, new_cache)``; the
    stack then returns ``(states, new_caches)``.
    """

    make: Callable[..., nn.Module]
    num_layers: int

    @nn.compact
    def __call__(self, x, *args, caches=None, **kwargs):
        states = [x]
        if caches is None:
            for i in range(self.num_layers):
                states.append(self.make(i, name=str(i))(states[-1], *args, **kwargs))
            return states
        if len(caches) != self.num_layers:
            raise ValueError(f"{len(caches)} caches for {self.num_layers} layers")
        new_caches = []
        for i in range(self.num_layers):
            y, cache = self.make(i, name=str(i))(states[-1], *args, cache=caches[i], **kwargs)
            states.append(y)
            new_caches.append(cache)
        return states, tuple(new_caches)


class RMSNorm(nn.Module):
    """T5's layer norm: ``weight * x / sqrt(mean(x^2) + eps)`` (no mean subtracted, no
    bias; the variance in float32), its scale named ``weight`` as in HF's Flax T5."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return weight.astype(x.dtype) * (x * jax.lax.rsqrt(variance + self.epsilon)).astype(x.dtype)


# --------------------------------------------------------- CNNs, torch semantics
BN_MOMENTUM = 0.9  # flax convention: 1 - torch momentum (0.1)
BN_EPS = 1e-5
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's conv init


def pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def torch_padding(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch's symmetric ``padding=p`` (or ``(ph, pw)``) as flax's per-edge pairs."""
    ph, pw = pair(padding)
    return ((ph, ph), (pw, pw))


def torch_conv(features: int, kernel: int | tuple[int, int], stride: int = 1, *, name: str,
               padding: int | tuple[int, int] | None = None, groups: int = 1, use_bias: bool = False,
               kernel_init=KAIMING_FAN_OUT) -> nn.Conv:
    """``nn.Conv`` as ``torch.nn.Conv2d``: ``padding`` on every side (``kernel // 2`` by
    default; ``"SAME"`` would pad stride-2 convs asymmetrically), ``groups`` channel groups."""
    kernel = pair(kernel)
    if padding is None:
        padding = (kernel[0] // 2, kernel[1] // 2)
    return nn.Conv(features, kernel, strides=stride, padding=torch_padding(padding),
                   feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init, name=name)


def torch_batch_norm(train: bool, name: str, *, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> nn.BatchNorm:
    """``nn.BatchNorm`` as ``torch.nn.BatchNorm2d``: batch statistics and running-stat
    updates (``mutable=["batch_stats"]``) only with ``train``. One difference remains
    in training: torch updates the running variance with the unbiased batch variance,
    flax with the biased one (a factor ``n / (n - 1)``, ``n = B * H * W``)."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=eps, name=name)


def torch_max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel, stride, padding)`` on NHWC (padding counts as ``-inf``)."""
    return nn.max_pool(x, pair(kernel), strides=pair(stride), padding=torch_padding(padding))


def to_nhwc(pixel_values) -> jax.Array:
    """HF/torch ``(B, C, H, W)`` -> flax ``(B, H, W, C)``."""
    return jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1))


def to_nchw(x: jax.Array) -> jax.Array:
    """flax ``(B, H, W, C)`` -> HF/torch ``(B, C, H, W)``."""
    return jnp.transpose(x, (0, 3, 1, 2))


def torch_avg_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0, *,
                   count_include_pad: bool = True) -> jax.Array:
    """``torch.nn.AvgPool2d(kernel, stride, padding, count_include_pad=...)`` on NHWC.

    With ``count_include_pad`` (torch's default) every window divides by
    ``kernel**2``; without it, by the number of real (unpadded) pixels in the window.
    """
    return nn.avg_pool(x, pair(kernel), strides=pair(stride), padding=torch_padding(padding),
                       count_include_pad=count_include_pad)


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(output_size)`` on NHWC: output cell ``i`` (per axis, input
    size ``n``, output size ``m``) averages inputs ``floor(i n / m) .. ceil((i + 1) n / m) - 1``
    (bins may overlap, or repeat one input when ``n < m``)."""
    (oh, ow), (h, w) = pair(output_size), x.shape[1:3]
    if (oh, ow) == (h, w):
        return x

    def bins(n, m):
        return [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)]

    rows = [x[:, a:b].mean(axis=1) for a, b in bins(h, oh)]              # each (B, W, C)
    x = jnp.stack(rows, axis=1)                                           # (B, oh, W, C)
    cols = [x[:, :, a:b].mean(axis=2) for a, b in bins(w, ow)]
    return jnp.stack(cols, axis=2)


def same_conv(features: int, kernel: int | tuple[int, int], stride: int = 1, *, name: str,
              groups: int = 1, use_bias: bool = False, kernel_init=KAIMING_FAN_OUT) -> nn.Module:
    """``nn.Conv`` with TensorFlow's ``"SAME"`` padding: output ``ceil(n / stride)``, total
    padding ``max((out - 1) * stride + k - n, 0)`` split ``total // 2`` before and the rest
    after -- what TF-trained checkpoints (EfficientNet, Keras) and their PyTorch ports
    (``Conv2dStaticSamePadding``) compute. ``groups=features`` is a depthwise conv
    (a :class:`DepthwiseConv`: the same parameters and outputs, faster on CPU)."""
    if groups == features > 1:
        return DepthwiseConv(features, pair(kernel), pair(stride), use_bias=use_bias, kernel_init=kernel_init,
                             name=name)
    return nn.Conv(features, pair(kernel), strides=stride, padding="SAME", feature_group_count=groups,
                   use_bias=use_bias, kernel_init=kernel_init, name=name)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """A depthwise convolution on NHWC, TF ``"SAME"`` padding: channel ``c`` of the output is
    ``sum_{i,j} kernel[i, j, 0, c] * x_pad[:, s*h + i, s*w + j, c]``.

    Parameters and outputs are those of ``nn.Conv(features, kernel_size, strides,
    padding="SAME", feature_group_count=features)`` (``kernel`` ``(kh, kw, 1, C)``,
    optional ``bias``), so a key map written for one loads the other. The sum is
    written as ``kh * kw`` strided slices times a per-channel weight, which XLA
    fuses into one loop; XLA:CPU lowers a grouped convolution to a generic one,
    3-10x slower forward and 3-9x slower forward + backward at EfficientNet's
    shapes (``benchmarks/README.md``). ``impl="conv"`` (or any backend but the
    CPU, with the default ``"auto"``) uses ``lax.conv_general_dilated``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    use_bias: bool = False
    kernel_init: Callable = KAIMING_FAN_OUT
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        (kh, kw), (sh, sw), c = self.kernel_size, self.strides, self.features
        if x.shape[-1] != c:
            raise ValueError(f"DepthwiseConv({c}) got {x.shape[-1]} input channels (a depthwise conv keeps them)")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        pads = (_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw))
        impl = self.impl if self.impl != "auto" else ("shifted" if jax.default_backend() == "cpu" else "conv")
        if impl == "conv":
            y = jax.lax.conv_general_dilated(x, kernel, (sh, sw), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=c)
        else:
            xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
            oh, ow = -(-x.shape[1] // sh), -(-x.shape[2] // sw)
            y = None
            for i in range(kh):
                for j in range(kw):
                    window = jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * sh + 1,
                                                            j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
                    term = window * kernel[i, j, 0]
                    y = term if y is None else y + term
        return y + bias if bias is not None else y


def same_avg_pool(x: jax.Array, kernel: int, stride: int = 1) -> jax.Array:
    """Keras ``AveragePooling2D(kernel, stride, padding="same")`` on NHWC: TF padding,
    each window divided by its number of real pixels."""
    return nn.avg_pool(x, pair(kernel), strides=pair(stride), padding="SAME", count_include_pad=False)


def drop_path(x: jax.Array, rate: float, *, deterministic: bool, rng: jax.Array | None = None) -> jax.Array:
    """Stochastic depth on a residual branch: each example's ``x`` is zeroed with
    probability ``rate`` and otherwise scaled by ``1 / (1 - rate)`` (timm's ``drop_path``,
    EfficientNet's ``drop_connect``). The identity when ``deterministic`` or ``rate == 0``;
    else ``rng`` (e.g. ``module.make_rng("dropout")``) draws the per-example keep mask."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class DropPath(nn.Dropout):
    """:func:`drop_path` as a module: stochastic depth with ``nn.Dropout``'s fields and
    call (``rate``, ``deterministic``, the ``"dropout"`` rng stream).

    A subclass of ``nn.Dropout`` on purpose: whatever treats dropout as dropout
    treats this as dropout too (a frozen block runs it as the identity in
    training, :func:`jaxfer.transfer.adapt.adabn` turns it off).
    """

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        return drop_path(inputs, self.rate, deterministic=False,
                         rng=rng if rng is not None else self.make_rng(self.rng_collection))

"""Named, reported operations on pretrained params trees.

Each function takes a params tree and the path of the tensor it changes (the
model family decides where that lives: ViT ``embeddings/position_embeddings``
and ``embeddings/patch_embeddings/projection/kernel``, ResNet
``embedder/embedder/convolution/kernel``; prefix ``vit/`` etc. inside a task
model), and returns ``(new_params, Surgery)``; the input tree is not modified.
A path that does not exist raises :class:`jaxfer.tree.NoMatchError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfer import tree


@dataclasses.dataclass(frozen=True)
class Surgery:
    """What an operation did: ``name``, ``path``, shapes ``before``/``after``, ``note``."""

    name: str
    path: str
    before: tuple
    after: tuple
    note: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.path}: {self.before} -> {self.after}" + (f" ({self.note})" if self.note else "")


def get(params: Any, path: str) -> Any:
    flat = tree.flatten(params)
    if path not in flat:
        raise tree.NoMatchError(path, list(flat), what="path")
    return flat[path]


def set_leaf(params: Any, path: str, value: Any) -> Any:
    """A copy of ``params`` (dicts copied along ``path`` only) with the leaf at ``path`` replaced."""
    get(params, path)
    head, *rest = path.split(tree.SEP)
    out = dict(params)
    out[head] = value if not rest else set_leaf(params[head], tree.SEP.join(rest), value)
    return out


def resize_position_embeddings(params: Any, path: str, new_grid: int | tuple[int, int], *,
                               num_prefix_tokens: int = 1, method: str = "bicubic") -> tuple[Any, Surgery]:
    """Interpolate ViT position embeddings ``(1, prefix + h*w, D)`` to a new patch grid.

    The first ``num_prefix_tokens`` rows (CLS, distillation) are kept as they are;
    the square ``h x w`` grid is resized with ``jax.image.resize`` (``"bicubic"``,
    ``"linear"``, ``"nearest"``). ``new_grid``: ``image_size // patch_size`` (int
    or ``(h, w)``). The same grid returns the tensor unchanged.
    """
    pe = jnp.asarray(get(params, path))
    if pe.ndim != 3:
        raise ValueError(f"{path}: expected (1, tokens, dim) position embeddings, got {pe.shape}")
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"{path}: {grid.shape[1]} patch positions are not a square grid "
                         f"(num_prefix_tokens={num_prefix_tokens}?)")
    if (old, old) == (new_h, new_w):
        return params, Surgery("resize_position_embeddings", path, pe.shape, pe.shape, "same grid, unchanged")
    d = grid.shape[-1]
    g = grid.reshape(pe.shape[0], old, old, d)
    g = jax.image.resize(g.astype(jnp.float32), (pe.shape[0], new_h, new_w, d), method=method).astype(pe.dtype)
    new = jnp.concatenate([prefix, g.reshape(pe.shape[0], new_h * new_w, d)], axis=1)
    note = f"grid {old}x{old} -> {new_h}x{new_w} ({method}), {num_prefix_tokens} prefix token(s) kept"
    return set_leaf(params, path, new), Surgery("resize_position_embeddings", path, pe.shape, new.shape, note)


def adapt_input_channels(params: Any, path: str, in_channels: int) -> tuple[Any, Surgery]:
    """Adapt a first conv kernel ``(..., C, O)`` (our HWIO layout) to ``in_channels``.

    1 channel: the sum over the pretrained input channels (a grey image equal
    to R=G=B gives the same activations). ``k`` channels: the pretrained channels
    repeated cyclically and scaled by ``C / k`` so the activation scale is kept.
    """
    k = jnp.asarray(get(params, path))
    c = k.shape[-2]
    if in_channels == c:
        return params, Surgery("adapt_input_channels", path, k.shape, k.shape, "same channels, unchanged")
    if in_channels == 1:
        new, note = k.sum(axis=-2, keepdims=True), f"sum over {c} channels"
    else:
        idx = np.arange(in_channels) % c
        new, note = jnp.take(k, idx, axis=-2) * (c / in_channels), f"repeat {c} channels, scale {c}/{in_channels}"
    return set_leaf(params, path, new), Surgery("adapt_input_channels", path, k.shape, new.shape, note)


def reset_head(params: Any, path: str, num_classes: int, rng: jax.Array | int = 0, *,
               init_std: float = 0.02) -> tuple[Any, Surgery]:
    """Replace the Dense at ``path`` (holding ``kernel``, ``bias``) by a fresh ``num_classes`` one.

    Kernel ~ N(0, init_std), bias 0 (HF's initialisation). Prefer ``load(head=...,
    reinit=[...])`` when loading; this is for trees you already hold.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    kernel = jnp.asarray(get(params, f"{path}/kernel"))
    new_kernel = init_std * jax.random.normal(rng, (*kernel.shape[:-1], num_classes), kernel.dtype)
    out = set_leaf(params, f"{path}/kernel", new_kernel)
    out = set_leaf(out, f"{path}/bias", jnp.zeros((num_classes,), kernel.dtype))
    return out, Surgery("reset_head", path, kernel.shape, new_kernel.shape, f"{num_classes} classes, fresh init")

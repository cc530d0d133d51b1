"""Named intermediate feature maps of any family (Keras ``include_top=False``, timm ``features_only``).

Each family names the module paths inside its backbone whose outputs are its
feature maps (``Family.feature_layers(config)``, shallow to deep): stage ends of
the CNNs (``blocks/<b>`` of VGG and EfficientNet, ``encoder/stages/<s>`` of
ResNet, ``Mixed_*`` of Inception-v3), the embeddings and every layer of the
transformers. :func:`feature_maps` runs the model once (eval mode) and returns
those modules' outputs, captured with flax's ``capture_intermediates``: no model
code changes, and any other module path of the backbone can be asked for too.

Maps come back as the module computes them: NHWC for the CNNs (flax's layout;
``jnp.transpose(x, (0, 3, 1, 2))`` gives torch's NCHW), ``(B, T, D)`` for the
transformers. A module returning a tuple (a transformer layer with its
attention) gives its first element.

    maps = feature_maps(model, pixel_values=x)                 # every named stage
    maps = feature_maps(model, ["blocks/3"], pixel_values=x)   # one stage
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxfer import tree

SEP = "/"


def layer_names(model) -> tuple[str, ...]:
    """The family's named feature layers for this model's config (backbone-relative paths)."""
    if model.family.feature_layers is None:
        raise ValueError(f"family {model.family.model_type!r} names no feature layers; pass layer paths")
    return tuple(model.family.feature_layers(model.config))


def _prefix(model) -> str:
    """Where the backbone sits in the model's module tree: ``"<prefix>/"`` under a task head, else ``""``."""
    prefix = getattr(model.module, "prefix", None)
    return f"{prefix}{SEP}" if prefix and hasattr(model.module, "backbone") else ""


def feature_maps(model, layers: Sequence[str] | None = None, *, params: Any = None,
                 **inputs: Any) -> dict[str, Any]:
    """``{layer: output}`` of ``layers`` (backbone-relative module paths; default
    :func:`layer_names`) for ``inputs``, the model in eval mode.

    ``model`` is a :class:`jaxfer.Model` (``jaxfer.load(...)``); ``params`` a params
    tree or full variables to use instead of the loaded ones. A path that names no
    module of the backbone is an error naming the nearest module paths.
    """
    wanted = tuple(layer_names(model) if layers is None else layers)
    if not wanted:
        raise ValueError("no feature layers asked for")
    prefix = _prefix(model)
    full = {prefix + layer: layer for layer in wanted}

    def keep(module, method_name: str) -> bool:
        return method_name == "__call__" and SEP.join(module.path) in full

    variables = dict(model.variables)
    if params is not None:
        variables = dict(params) if isinstance(params, Mapping) and "params" in params else {
            **variables, "params": params}
    _, state = model.module.apply(variables, **inputs, capture_intermediates=keep, mutable=["intermediates"])
    captured = {full[path]: value for path, value in _calls(state.get("intermediates", {}), ()) if path in full}
    missing = [layer for layer in wanted if layer not in captured]
    if missing:
        raise tree.NoMatchError(missing[0], _module_paths(model, prefix), what="feature layer")
    return {layer: captured[layer] for layer in wanted}


def _calls(node: Mapping, path: tuple[str, ...]):
    """``(module path, first output)`` of every captured ``__call__`` (flax stores a tuple of
    the calls' outputs under ``__call__``; a module called twice keeps its first)."""
    for key, value in node.items():
        if key == "__call__":
            out = value[0]
            yield SEP.join(path), out[0] if isinstance(out, tuple) else out
        elif isinstance(value, Mapping):
            yield from _calls(value, (*path, key))


def _module_paths(model, prefix: str) -> list[str]:
    """Every module path of the backbone (from its parameter paths), backbone-relative."""
    paths = set()
    for path in tree.flatten(model.params):
        if path.startswith(prefix):
            parts = path[len(prefix):].split(SEP)[:-1]
            paths.update(SEP.join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(paths)

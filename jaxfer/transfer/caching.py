"""What a run computes once: the runner's choice between cached features, a cached
frozen prefix and nothing, with the reason it prints.

``prepare`` looks at a run's model, trainable mask and data:

* only the head trains -> the pooled features the head reads
  (:func:`jaxfer.transfer.features.head_input_fn`) are computed once per example
  and the head trains on them (:func:`jaxfer.transfer.features.head_apply`);
* the layers from ``k`` up train -> the boundary activations below layer ``k``
  are computed once (:mod:`jaxfer.transfer.prefix`) and the model runs from
  there (:func:`jaxfer.transfer.prefix.cached_apply`);
* otherwise (or when it would not be exact) nothing is cached, and the
  returned message says why.

Training, validation and test batches all carry the cached rows, so every pass
skips the frozen part. Caches live in ``directory`` (chunked ``.npy`` files),
keyed by a fingerprint of the frozen parameters, the model config, the cut
and the data, so a second run of the same recipe reuses them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfer import tree
from jaxfer.transfer import batches as batches_lib
from jaxfer.transfer import features as features_lib
from jaxfer.transfer import prefix as prefix_lib
from jaxfer.transfer import probe as probe_lib

MODES = ("auto", "off")


@dataclasses.dataclass
class Cached:
    """The cached replacements for a run's apply function and batches."""

    kind: str                   # "features" or "prefix"
    apply_fn: Callable
    train: Any
    validation: Any
    test: Any
    features: dict[str, features_lib.Features]
    message: str
    module: str | None = None   # the prefix boundary

    def timer(self) -> Callable:
        """A ``fit`` hook timing each step, and whether it filled the training cache."""
        last: list[float] = []
        fills = [0]

        def hook(step, state, records) -> None:
            now, filled = time.perf_counter(), getattr(self.features["train"], "computed", 0)
            if last and not any(r.get("split") == "eval" for r in records):  # evals are not steps
                self._times.append((now - last[0], filled > fills[0]))
            last[:] = [now]
            fills[0] = filled

        self._times: list[tuple[float, bool]] = []
        return hook

    def speedup_message(self) -> str:
        """Measured: steps that ran on the cache against steps that first had to fill it
        (their frozen part ran, as in every step of an uncached run), compiles skipped.

        Each kind's time per step is its summed wall time over its count, not a median
        of step intervals: steps are dispatched asynchronously, so most intervals are
        only the host's dispatch (a few ms) and the device's work lands on the few that
        wait for it (a metrics fetch, a checkpoint). A median of intervals once printed
        "4 ms per step on the cache ... 52.5x faster" for steps that took 136 ms."""
        times = getattr(self, "_times", [])[2:]
        on_cache = [t for t, filled in times if not filled]
        filling = [t for t, filled in times if filled]
        label = "cached features" if self.kind == "features" else "cached frozen prefix"
        if on_cache and filling:
            a, b = float(np.mean(on_cache)), float(np.mean(filling))
            return (f"{label}: {a * 1e3:.0f} ms per step on the cache, {b * 1e3:.0f} ms per step that first ran "
                    f"the frozen part (measured: wall time over {len(on_cache)} and {len(filling)} steps): "
                    f"{b / a:.2f}x faster once an example is cached")
        if filling:
            return (f"{label}: {float(np.mean(filling)) * 1e3:.0f} ms per step, every one filling the cache "
                    "(the run ended within its first epoch: the cache pays from the second)")
        if on_cache:
            return f"{label}: {float(np.mean(on_cache)) * 1e3:.0f} ms per step, all on the cache"
        return f"{label}: no steps timed"


def augmentation(batches: Any) -> str | None:
    """How a training iterator randomly changes its inputs (``None``: it does not)."""
    it = getattr(batches, "iterator", batches)  # Prefetch wraps one
    reasons = []
    if getattr(it, "map_fn", None) is not None:
        reasons.append("a per-example transform")
    if getattr(it, "batch_fn", None) is not None:
        reasons.append("a per-batch transform such as mixup")
    return " and ".join(reasons) or None


def _frozen_fingerprint(variables: Mapping[str, Any], trainable: Any, *extra: Any) -> str:
    flat_mask = tree.flatten(trainable)
    frozen = {p: v for p, v in tree.flatten(jax.device_get(variables)).items()
              if not (p.startswith("params/") and flat_mask.get(p[len("params/"):], False))}
    return features_lib.fingerprint(frozen, *extra)


def head_only(trainable: Any, head_name: str) -> bool:
    """Only leaves under ``head_name`` train."""
    flat = tree.flatten(trainable)
    return any(flat.values()) and all(p.startswith(head_name + "/") for p, t in flat.items() if t)


def prepare(model: Any, variables: Mapping[str, Any], trainable: Any, *, train: Any, validation: Any,
            test: Any, layer_pattern: Any, head: Any = None, head_name: str = "classifier", directory: str | None = None,
            frozen_dropout: bool = True, mode: str = "auto", config: Any = None,
            multi_process: bool = False, eager: bool = False) -> tuple[Cached | None, str]:
    """``(cached, message)``: the cached replacements, or ``None`` and why not.

    ``model`` is the task model (a Linen ``TaskModel``: ``backbone`` under a
    prefix, ``head`` under ``head_name``) or the ``apply_fn`` the run trains with
    (LoRA- or adapter-wrapped: then their parameters count as what trains);
    ``head`` the head module (for training it on cached features); ``train`` a resumable training iterator,
    ``validation``/``test`` re-iterable evaluation batches with example ids.
    Rows are computed on first use (:class:`~jaxfer.transfer.batches.OnDemand`),
    or, with ``eager``, for every example up front (a full-batch probe needs them all).
    """
    if mode not in MODES:
        raise ValueError(f"transfer.cache must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None, "cache: off (transfer.cache='off'): every step runs the whole model"
    if multi_process:
        return None, "cache: not used (it is built per process; this run spans several)"
    augmented = augmentation(train)
    if augmented:
        return None, f"cache: not used (the training inputs are randomly augmented: {augmented})"
    sample = _first_batch(train)
    if features_lib.ID_KEY not in sample:
        return None, f"cache: not used (the batches carry no example {features_lib.ID_KEY!r})"
    model_fp = _frozen_fingerprint(variables, trainable, config, head_name)
    # the cache's own copy: a train step donates (consumes) the arrays of the state it is given
    variables = jax.tree_util.tree_map(jnp.copy, variables)
    splits = {"train": train, "validation": validation, "test": test}

    def keep(fn, prefix):
        row_shape = jax.eval_shape(fn, variables, _full_width(sample, test)).shape[1:]
        out = {}
        for name, b in splits.items():
            key = _key(prefix, model_fp, b, name == "train")
            if eager:
                out[name] = features_lib.cached(fn, variables, _eval_view(b) if name == "train" else b,
                                                directory=directory, key=key)
            else:
                out[name] = batches_lib.OnDemand(fn, variables, batches_lib.source_ids(b), directory=directory,
                                                  key=key + "-lazy", row_shape=tuple(row_shape))
        return out

    head = head if head is not None else getattr(model, "head", None)
    if head_only(trainable, head_name) and frozen_dropout and head is not None:
        feats = keep(features_lib.head_input_fn(model, head_name), "features")
        drop = tuple(k for k in sample if k not in ("label", "mask", features_lib.ID_KEY))
        cached = Cached(
            "features", features_lib.head_apply(head, head_name),
            batches_lib.with_features(train, feats["train"], drop=drop),
            batches_lib.with_features(validation, feats["validation"], drop=drop),
            batches_lib.with_features(test, feats["test"], drop=drop), feats,
            _message("features", "the backbone", feats))
        return cached, cached.message

    p = prefix_lib.plan(model, variables, trainable, sample, layer_pattern=layer_pattern,
                        frozen_dropout=frozen_dropout)
    if not p.exact:
        return None, p.describe()
    boundary = prefix_lib.boundary_fn(model, p.module)
    feats = keep(lambda v, b: boundary(v, b), f"prefix-{p.module.replace('/', '.')}")
    key = prefix_lib.BOUNDARY_KEY
    cached = Cached(
        "prefix", prefix_lib.cached_apply(model, p.module),
        batches_lib.with_features(train, feats["train"], key=key, length_key="attention_mask"),
        batches_lib.with_features(validation, feats["validation"], key=key, length_key="attention_mask"),
        batches_lib.with_features(test, feats["test"], key=key, length_key="attention_mask"), feats,
        _message("prefix", f"{p.span()} of {p.num_layers} (up to {p.module!r})", feats),
        module=p.module)
    return cached, cached.message


def _full_width(sample: Mapping[str, Any], batches: Any) -> dict:
    """The model inputs of ``sample`` padded back to the source's token width (batches may
    be cut to their longest sequence; a cached row holds every position)."""
    from jaxfer.data.text import TOKEN_KEYS

    source = getattr(getattr(batches, "iterator", batches), "source", None)
    while source is not None and not hasattr(source, "columns") and hasattr(source, "local"):
        source = source.local
    cols = getattr(source, "columns", {})
    out = {}
    for k, v in sample.items():
        if k in ("label", "mask", features_lib.ID_KEY):
            continue
        if k in TOKEN_KEYS and k in cols and np.shape(v)[1] < np.shape(cols[k])[1]:
            v = np.pad(v, ((0, 0), (0, np.shape(cols[k])[1] - np.shape(v)[1])))
        out[k] = v
    return out


def _key(prefix: str, model_fp: str, batches: Any, train: bool) -> str:
    return f"{prefix}-{model_fp}-{features_lib.source_fingerprint(_eval_view(batches) if train else batches)}"


def head_features(model: Any, variables: Mapping[str, Any], *, train: Any, validation: Any,
                  head_name: str = "classifier", directory: str | None = None, config: Any = None
                  ) -> dict[str, features_lib.Features]:
    """The pooled features the head reads, for every training and validation example,
    computed up front (cached under ``directory``): what a full-batch probe fits on.
    Shares its cache with :func:`prepare` for a run that trains only the head."""
    head_mask = tree.map_with_path(lambda p, _: p.startswith(head_name + "/"), variables["params"])
    model_fp = _frozen_fingerprint(variables, head_mask, config, head_name)
    fn = features_lib.head_input_fn(model, head_name)
    return {name: features_lib.cached(fn, variables, _eval_view(b) if name == "train" else b, directory=directory,
                                      key=_key("features", model_fp, b, name == "train"))
            for name, b in (("train", train), ("validation", validation))}


def _message(kind: str, what: str, feats: Mapping[str, Any]) -> str:
    sizes = " + ".join(f"{len(f):,} {name}" for name, f in feats.items())
    where = next(iter(feats.values())).directory
    where = f" in {os.path.dirname(where)}" if where else " in memory"
    label = "cached features" if kind == "features" else "cached frozen prefix"
    lazy = [f for f in feats.values() if isinstance(f, batches_lib.OnDemand)]
    if lazy:
        reused = sum(f.reused for f in lazy)
        how = f"on first use, kept{where}" + (f"; {reused:,} reused from an earlier run" if reused else "")
    else:
        mb = sum(f.nbytes for f in feats.values()) / 2**20
        how = ("reused from an earlier run" if all(f.reused for f in feats.values()) else
               f"computed in {sum(f.seconds for f in feats.values()):.0f} s") + f", {mb:,.0f} MiB{where}"
    return f"{label}: {what} run once per example ({sizes}: {how}); training runs on the cache"


def _first_batch(train: Any) -> dict:
    state = train.get_state()
    batch = next(train)
    train.set_state(state)
    return batch


def _eval_view(train: Any):
    """Every training example once, in evaluation batches (for computing the cache)."""
    from jaxfer.data.iterators import EvalBatches

    it = getattr(train, "iterator", train)
    return EvalBatches(it.source, max(it.batch_size, 64))


def labels(batches: Any, ids: np.ndarray, *, label_key: str = "label") -> np.ndarray:
    """The labels of example ``ids``, read from evaluation ``batches`` (no model runs)."""
    seen_ids, seen = [], []
    for b in batches:
        keep = np.asarray(b.get("mask", np.ones(len(b[label_key]))), np.float32) > 0
        seen_ids.append(np.asarray(b[features_lib.ID_KEY])[keep])
        seen.append(np.asarray(b[label_key])[keep])
    by_id = features_lib.Features(np.concatenate(seen_ids), [np.concatenate(seen)])
    return by_id.take(ids)


def fit_probe(solver: str, feats: Mapping[str, features_lib.Features], *, train: Any, validation: Any,
              num_classes: int, l2_grid, metric: str = "accuracy", **kw
              ) -> tuple[dict[str, np.ndarray], float, list[dict]]:
    """A linear head by ``solver`` on cached features ``feats["train"]``, ``l2`` chosen on
    ``feats["validation"]`` (labels read from the ``train``/``validation`` batches).
    Returns the head params ``{"kernel", "bias"}``, the chosen ``l2`` and the scores."""
    xt, xv = feats["train"], feats["validation"]
    if isinstance(xt, batches_lib.OnDemand) or isinstance(xv, batches_lib.OnDemand):
        raise ValueError("a full-batch probe needs every row: compute the features up front")
    yt = labels(_eval_view(getattr(train, "batches", train)), xt.ids)
    yv = labels(getattr(validation, "batches", validation), xv.ids)
    l2, head, scores = probe_lib.select_l2(solver, (xt.array(), yt), (xv.array(), yv), l2_grid,
                                           num_classes=num_classes, metric=metric, **kw)
    return probe_lib.as_head_params(head), l2, scores

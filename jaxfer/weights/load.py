"""``load(source, head=...)`` -> :class:`Model`: module, variables, config, report.

Steps: resolve the source (local path or hub id) -> read ``config.json`` ->
registry family by ``model_type`` -> build the backbone (wrapped with the head
in a :class:`~jaxfer.models.heads.TaskModel` when ``head`` is given) -> shapes
of a fresh init via ``jax.eval_shape`` -> read and convert the checkpoint ->
strict check (:mod:`jaxfer.weights.strict`).

Heads and task checkpoints. Keys outside the backbone prefix of a task
checkpoint (``classifier.*`` next to ``bert.*``) are head keys:

* ``head=None``: they are dropped and listed in ``report.dropped`` -- taking the
  backbone out of a fine-tuned model is the usual first step of transfer, so it
  is not an error (keys *inside* the backbone that do not fit still are);
* ``head`` given and the checkpoint has head keys: they are merged strictly, so a
  1000-class head into a 3-class model fails unless ``reinit=["classifier/**"]``;
* ``head`` given and the checkpoint has no head keys: the head is initialised
  afresh and listed in ``report.initialized``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer import tree
from jaxfer.errors import DataError
from jaxfer.models import registry
from jaxfer.models.heads import TaskModel, train_kwarg
from jaxfer.models.keymap import apply_key_map, generic_rules, strip_prefix
from jaxfer.weights import readers, sources, strict

HEAD_NAME = "classifier"


@dataclasses.dataclass
class Model:
    """A loaded model: Linen ``module`` + ``variables`` (``{"params": ..., "batch_stats": ...}``).

    ``apply(params, *args, train=False, rngs=None, **inputs)`` runs the module
    with ``params`` (a params tree, or a full variables dict; ``None``: the loaded
    ones) and the other loaded collections. For jit:
    ``jax.jit(model.apply, static_argnames="train")``.
    """

    module: nn.Module
    variables: dict[str, Any]
    config: Any
    family: registry.Family
    report: strict.LoadReport
    source: Path | None = None

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """The head's class names from the config's ``id2label`` (``None`` without a head)."""
        if not isinstance(self.module, TaskModel):
            return None
        id2label = _get(self.config, "id2label") or {}
        n = getattr(self.module.head, "num_classes", len(id2label))
        labels = {int(k): str(v) for k, v in id2label.items()}
        return tuple(labels.get(i, f"LABEL_{i}") for i in range(n))

    @property
    def state(self) -> dict[str, Any]:
        """Non-parameter collections (``batch_stats`` ...), possibly empty."""
        return {k: v for k, v in self.variables.items() if k != "params"}

    def dummy_inputs(self) -> dict:
        return self.family.dummy_inputs(self.config)

    def init_fn(self, rng: jax.Array | int = 0) -> dict[str, Any]:
        """Fresh random variables for the same module (not the pretrained ones)."""
        return _init(self.module, self.family, self.config, rng)

    def text_limits(self) -> dict[str, int]:
        """``{"vocab_size", "max_positions"}`` of a text model (empty for others), the
        bounds its inputs must respect; ``data.make_pipeline(..., **model.text_limits())``."""
        if self.family.text_limits is None:
            return {}
        vocab_size, max_positions = self.family.text_limits(self.config)
        limits = {"vocab_size": vocab_size}
        if max_positions is not None:  # T5: relative positions, no table
            limits["max_positions"] = max_positions
        return limits

    def apply(self, params: Any = None, *args, train: bool = False, rngs: Any = None,
              mutable: Any = False, **inputs):
        if args and isinstance(args[0], Mapping):
            raise TypeError(f"model.apply got a dict of inputs ({sorted(args[0])[:4]}) as a "
                            "positional argument; pass them as keywords: model.apply(params, **batch)")
        self._check_inputs(inputs)
        variables = dict(self.variables)
        if params is not None:
            variables.update(params if "params" in params else {"params": params})
        return self.module.apply(variables, *args, rngs=rngs, mutable=mutable,
                                 **inputs, **train_kwarg(self.module, train))

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Concrete token ids against the vocabulary and position table (not under jit)."""
        ids = inputs.get("input_ids")
        limits = self.text_limits()
        if ids is None or not limits or isinstance(ids, jax.core.Tracer):
            return
        from jaxfer.data.text import check_token_ids

        check_token_ids(np.asarray(ids), limits["vocab_size"], "model.apply input_ids")
        if np.shape(ids)[-1] > limits.get("max_positions", np.inf):
            raise DataError(f"model.apply input_ids hold {np.shape(ids)[-1]} tokens but the model's "
                            f"position table holds {limits['max_positions']}: truncate them "
                            f"(tokenizer(..., truncation=True, max_length={limits['max_positions']}))")

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def tokenizer(self, **kw):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self._dir()), **kw)

    def processor(self, **kw):
        import transformers

        return transformers.AutoImageProcessor.from_pretrained(str(self._dir()), **kw)

    def preprocessing(self) -> dict | None:
        """The image inputs the weights expect: ``{size, crop_pct, mean, std, resample}`` from
        the checkpoint's ``preprocessor_config.json``, else the family's description, else
        ``None`` (text models); :func:`jaxfer.data.image.transform_options` turns it into
        transform arguments."""
        found = sources.read_preprocessing(self.source) if self.source is not None else None
        if found is None and self.family.preprocessing is not None:
            found = self.family.preprocessing(self.config)
        return found

    def _dir(self) -> Path:
        if self.source is None:
            raise ValueError("this model was not loaded from a directory")
        return self.source if self.source.is_dir() else self.source.parent


def _init(module, family, config, rng, only: Sequence[tuple[str, str]] | None = None) -> dict:
    """Random variables for ``module``; with ``only``, just those ``(collection, path)``
    leaves, flat. Inside ``jit`` XLA then drops the initialisers of every other
    leaf, so a new head on a huge backbone costs the head's memory, not the model's."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    params_rng, dropout_rng = jax.random.split(rng)
    inputs = family.dummy_inputs(config)

    def init(r, d):
        variables = module.init({"params": r, "dropout": d}, **inputs, **train_kwarg(module, False))
        if only is None:
            return variables
        flat = _flat({c: tree.flatten(t) for c, t in variables.items()})
        return [flat[k] for k in only]

    out = jax.jit(init)(params_rng, dropout_rng)
    return out if only is None else dict(zip(only, out))


def _with_defaults(head: nn.Module, family: registry.Family, config: Any) -> nn.Module:
    """Fill a head's ``pooling=None``/``dropout_rate=None`` from the family and config."""
    changes = {}
    if getattr(head, "pooling", "") is None:
        changes["pooling"] = family.default_pooling
    if getattr(head, "dropout_rate", 0.0) is None:
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        rate = get("classifier_dropout", None)
        changes["dropout_rate"] = float(rate if rate is not None else get("hidden_dropout_prob", 0.0) or 0.0)
    return head.clone(**changes) if changes else head


def _flat(variables: Mapping[str, Mapping[str, Any]], prefix: str = "") -> dict[strict.Key, Any]:
    pre = prefix + "/" if prefix else ""
    return {(c, pre + p): v for c, vs in variables.items() for p, v in vs.items()}


def _split_ours(variables: Mapping[str, Mapping[str, np.ndarray]], prefix: str):
    """Our-layout checkpoint -> (backbone flat vars without prefix, head flat vars with paths)."""
    params = variables.get("params", {})
    if not prefix or not any(p.startswith(prefix + "/") for p in params):
        return dict(variables), {}
    backbone, head = {}, {}
    for c, vs in variables.items():
        for p, v in vs.items():
            if p.startswith(prefix + "/"):
                backbone.setdefault(c, {})[p[len(prefix) + 1:]] = v
            else:
                head.setdefault(c, {})[p] = v
    return backbone, head


CHECKPOINT_HEAD = "checkpoint"
_TASKS = {"single_label_classification": "classification",  # HF problem_type -> jaxfer.tasks kind
          "multi_label_classification": "multi_label", "regression": "regression"}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def checkpoint_head(family: registry.Family, config: Any) -> nn.Module:
    """The head of the HF task class named in ``config.architectures`` (``Family.task_heads``),
    sized by ``num_labels``/``id2label``, its loss from ``problem_type``."""
    archs = list(_get(config, "architectures") or [])
    arch = next((a for a in archs if a in family.task_heads), None)
    if arch is None:
        raise ValueError(f"head='checkpoint': config.json names architectures {archs}, none with a head "
                         f"jaxfer builds for {family.model_type!r} (known: {sorted(family.task_heads)}); "
                         "pass a head module, e.g. heads.Classifier(num_classes=...)")
    id2label = _get(config, "id2label") or {}
    n = int(_get(config, "num_labels", None) or len(id2label) or 2)
    head = family.task_heads[arch](n, config)
    task = _TASKS.get(_get(config, "problem_type") or "", "classification")
    return head.clone(task=task) if hasattr(head, "task") else head


def load(source: str | os.PathLike, head: nn.Module | str | None = None, *,
         reinit: Sequence[tree.Pattern] = (), ignore: Sequence[tree.Pattern] = (),
         dtype: Any = None, rng: jax.Array | int = 0, config: Any = None,
         weights: str | os.PathLike | None = None, revision: str | None = None,
         place: Callable[[str, str, Any, Any], jax.Array] | None = None) -> Model:
    """Load pretrained weights strictly into a jaxfer model.

    Args:
      source: local directory (``config.json`` + weights) or Hugging Face Hub id.
      head: a head module (e.g. ``heads.Classifier(3)``) to attach under
        ``"classifier"``; the backbone then lives under the family's prefix.
        ``"checkpoint"``: the head of the task class the checkpoint was saved
        from (``BertForSequenceClassification`` ...; see :func:`checkpoint_head`),
        its label names in ``model.label_names``.
      reinit: model paths to initialise afresh even if the checkpoint has them
        (or has them with another shape); each pattern must match something.
      ignore: checkpoint keys (converted path, or torch name with ``/``) to drop.
      dtype: cast floating-point variables to this dtype (default: the model's, float32).
      rng: key or seed for any fresh initialisation.
      config: override ``config.json`` (HF config or dict with ``model_type``).
      weights: a weights file or directory other than ``source`` (e.g. orbax).
      place: ``place(collection, path, value, dtype) -> jax.Array`` puts each
        leaf where it belongs (e.g. its shard on a mesh, see
        ``jaxfer.train.parallel.JitStrategy.param_placer``) instead of whole on
        the default device, so a model larger than one device loads sharded.
    """
    src = sources.resolve(source, revision=revision)
    config = sources.read_config(src) if config is None else config
    family = registry.get(sources.model_type(config))
    if isinstance(head, str):
        if head != CHECKPOINT_HEAD:
            raise ValueError(f"head={head!r}: give a head module or {CHECKPOINT_HEAD!r}")
        head = checkpoint_head(family, config)
    module = family.build(config)
    prefix = family.base_model_prefix
    if head is not None:
        module = TaskModel(module, _with_defaults(head, family, config), prefix=prefix, head_name=HEAD_NAME)

    abstract = jax.eval_shape(lambda: _init(module, family, config, rng))
    expected = _flat({c: tree.flatten(t) for c, t in abstract.items()})

    ckpt = readers.read(weights if weights is not None else src)
    unused: list[str] = []
    converted = 0
    dropped: dict[str, str] = {}
    if ckpt.state_dict is not None:
        inner, rest = strip_prefix(ckpt.state_dict, prefix)
        backbone, unused = family.convert(inner, config)
        if family.head_map and rest:  # the task class's own head beside the prefix (wav2vec2's lm_head)
            own_rest, rest_unused = apply_key_map(family.head_map, rest)
            others = {k: rest[k] for k in rest_unused}
        else:
            own_rest, others = {}, rest
        head_vars, head_unused = apply_key_map(generic_rules(), others)
        for c, vs in own_rest.items():
            head_vars.setdefault(c, {}).update(vs)
        if family.head_map and unused:  # the checkpoint's own head under another name (EfficientNet's _fc)
            own_head, unused = apply_key_map(family.head_map, {k: inner[k] for k in unused})
            for c, vs in own_head.items():
                head_vars.setdefault(c, {}).update(vs)
        unused = [f"{prefix}.{k}" if rest else k for k in unused]
        for k in head_unused:  # foreign head buffers: dropped; our head namespace: strict
            if k.startswith(HEAD_NAME + ".") and head is not None:
                unused.append(k)
            else:
                dropped[k] = "not part of the model"
        converted = sum(len(vs) for part in (backbone, head_vars) for vs in part.values())
    else:
        backbone, head_vars = _split_ours(ckpt.variables, prefix)
    head_flat = _flat(head_vars)
    ours = {k: v for k, v in head_flat.items() if head is not None and k[1].startswith(HEAD_NAME + "/")}
    for k in head_flat.keys() - ours.keys():
        dropped[strict.show(k)] = "head keys; no head asked for" if head is None else "another head's keys"

    found = _flat(backbone, prefix if head is not None else "")
    found.update(ours)
    new = [k for k in expected if k[1].startswith(HEAD_NAME + "/")] if head is not None and not ours else []
    plan = strict.plan(expected, found, unused, reinit=reinit, ignore=ignore, new=new, source=str(src))

    fresh_flat = _init(module, family, config, rng, only=list(plan.fresh)) if plan.fresh else {}
    report = strict.LoadReport(source=str(src), format=ckpt.format, files=[str(f) for f in ckpt.files],
                              converted=converted, dropped={**dict(sorted(dropped.items())), **plan.dropped})
    out: dict[str, dict[str, Any]] = {}
    for key, want in expected.items():
        coll, path = key
        if key in plan.take:
            value = plan.take[key]
            report.loaded.append(strict.show(key))
        else:
            value = fresh_flat[key]
            why = plan.fresh[key]
            if why == "new head":
                report.initialized.append(strict.show(key))
            else:
                report.reinitialized[strict.show(key)] = why
        target = want.dtype
        if dtype is not None and jnp.issubdtype(want.dtype, jnp.floating):
            target = jnp.dtype(dtype)
        if np.dtype(value.dtype) != np.dtype(target):
            report.cast[strict.show(key)] = f"{np.dtype(value.dtype).name}->{np.dtype(target).name}"
        out.setdefault(coll, {})[path] = (jnp.asarray(value, dtype=target) if place is None
                                          else place(coll, path, value, target))
    variables = {c: tree.unflatten(vs) for c, vs in out.items()}
    return Model(module=module, variables=variables, config=config, family=family, report=report, source=src)


def init_model(config: Any, head: nn.Module | None = None, *, rng: jax.Array | int = 0, dtype: Any = None,
               tokenizer: str | os.PathLike | None = None,
               place: Callable[[str, str, Any, Any], jax.Array] | None = None) -> Model:
    """A model of ``config`` (HF config or dict with ``model_type``) with random weights:
    training from scratch, where no pretrained weights exist (never what :func:`load`
    does silently). Every leaf is listed in ``report.initialized``.

    ``tokenizer``: a folder with tokenizer files, what ``model.tokenizer()`` reads (and
    ``jf.save`` copies). ``head``, ``dtype``, ``place`` as for :func:`load`.
    """
    family = registry.get(sources.model_type(config))
    module = family.build(config)
    if head is not None:
        module = TaskModel(module, _with_defaults(head, family, config), prefix=family.base_model_prefix,
                           head_name=HEAD_NAME)
    variables = _init(module, family, config, rng)
    report = strict.LoadReport(source="random initialisation", format="none")
    out: dict[str, dict[str, Any]] = {}
    for coll, leaves in variables.items():
        for path, value in tree.flatten(leaves).items():
            report.initialized.append(strict.show((coll, path)))
            target = value.dtype
            if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
                target = jnp.dtype(dtype)
            out.setdefault(coll, {})[path] = (jnp.asarray(value, dtype=target) if place is None
                                              else place(coll, path, np.asarray(value), target))
    variables = {c: tree.unflatten(vs) for c, vs in out.items()}
    source = None if tokenizer is None else Path(tokenizer)
    return Model(module=module, variables=variables, config=config, family=family, report=report, source=source)

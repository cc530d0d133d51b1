"""Save a jaxfer model back to the Hugging Face layout: ``config.json`` + ``model.safetensors``.

    jf.save(model, "out", params=state.params, label_names=("neg", "neu", "pos"))
    # PyTorch: transformers.AutoModelForSequenceClassification.from_pretrained("out")
    # jaxfer:  jf.load("out", head="checkpoint")   -- the same params, bit for bit

What is written:

* ``model.safetensors``: the backbone under the family's HF names and prefix
  (``bert.encoder.layer.0.attention.self.query.weight``), every transform of
  its key map undone (:func:`jaxfer.models.keymap.invert_key_map`, checked to
  convert back exactly), and the head under HF's names (``classifier.weight``,
  ``classifier.1.weight`` for ResNet); batch-norm statistics included;
* ``config.json``: the model's config with ``architectures`` (the HF task class
  whose head is the model's head, see ``Family.task_heads``; the bare backbone
  class without a head), ``id2label``/``label2id`` from ``label_names``,
  ``problem_type``, and ``add_pooling_layer`` (whether the backbone has a pooler);
* the tokenizer or image processor of the model's source folder, if it has one
  (or the ``tokenizer`` given).

A head HF has no class for (``Classifier(pooling="mean")`` on BERT, a
multi-head model, LoRA factors not merged) is an error that says so.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer import tree
from jaxfer.models.heads import TaskModel
from jaxfer.models.keymap import generic_rules, invert_key_map

WEIGHTS_FILE = "model.safetensors"
# jaxfer.tasks kind -> HF config.problem_type
PROBLEM_TYPES = {"classification": "single_label_classification",
                 "multi_label": "multi_label_classification", "regression": "regression"}
_HEAD_FIELDS = ("pooling", "dense_name")


class SaveError(ValueError):
    """The model cannot be written in the Hugging Face layout (the message says why)."""


def _variables(model, params) -> dict[str, Any]:
    import jax

    variables = dict(model.variables)
    if params is not None:
        variables.update(params if "params" in params else {"params": params})
    variables = jax.device_get(variables)
    extra = sorted(set(variables["params"]) & {"lora", "adapters"})
    if extra:
        raise SaveError(f"params hold {extra}: merge LoRA factors first "
                        "(jaxfer.transfer.lora.merge(params, spec)); adapters add modules HF's class lacks")
    return variables


def task_architecture(model) -> str:
    """The HF task class whose head is ``model``'s head (``Family.task_heads``)."""
    head, family = model.module.head, model.family
    if not hasattr(head, "num_classes"):
        raise SaveError(f"a {type(head).__name__} head has no Hugging Face class; save the backbone "
                        "(jaxfer.load without head=) or export for serving (jaxfer.export)")
    for arch, make in family.task_heads.items():
        theirs = make(head.num_classes, model.config)
        if type(theirs) is type(head) and all(getattr(theirs, f, None) == getattr(head, f, None)
                                              for f in _HEAD_FIELDS):
            return arch
    mine = {f: getattr(head, f, None) for f in _HEAD_FIELDS}
    known = {a: {f: getattr(m(1, model.config), f, None) for f in _HEAD_FIELDS}
             for a, m in family.task_heads.items()}
    raise SaveError(f"no Hugging Face class has this {type(head).__name__} head {mine} on "
                    f"{family.model_type!r}; the heads HF defines: {known or 'none'}")


def state_dict(model, params=None) -> tuple[dict[str, np.ndarray], str]:
    """``({HF key: array}, architecture)`` of ``model`` with ``params`` (default: its own)."""
    variables = _variables(model, params)
    family, prefix = model.family, model.family.base_model_prefix
    if not family.key_map:
        raise SaveError(f"the {family.model_type!r} family registers no key_map to invert")
    is_task = isinstance(model.module, TaskModel)
    backbone: dict[str, dict[str, Any]] = {}
    head: dict[str, dict[str, Any]] = {}
    for c, t in variables.items():
        for path, v in tree.flatten(t).items():
            if is_task and path.startswith(prefix + "/"):
                backbone.setdefault(c, {})[path[len(prefix) + 1:]] = v
            elif is_task and path.startswith(model.module.head_name + "/"):
                head.setdefault(c, {})[path] = v
            elif is_task:
                raise SaveError(f"{c}:{path} is neither backbone ({prefix}/...) nor head")
            else:
                backbone.setdefault(c, {})[path] = v
    out, unmatched = invert_key_map(family.key_map, backbone)
    if is_task:
        out = {f"{prefix}.{k}": v for k, v in out.items()}
        head_out, head_unmatched = invert_key_map(generic_rules(), head)
        unmatched += head_unmatched
        out.update(head_out)
        arch = task_architecture(model)
    else:
        arch = f"{type(model.config).__name__.removesuffix('Config')}Model"
    if unmatched:
        raise SaveError(f"{len(unmatched)} leaves have no checkpoint name in the "
                        f"{family.model_type!r} key map, e.g. {unmatched[:3]}")
    for k in [k for k in out if k.endswith(".running_mean")]:  # a torch BatchNorm buffer key maps drop
        out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", np.zeros((), np.int64))
    return out, arch


def _config(model, arch: str, label_names, has_pooler: bool):
    config = copy.deepcopy(model.config)
    updates: dict[str, Any] = {"architectures": [arch], "add_pooling_layer": has_pooler}
    if isinstance(model.module, TaskModel):
        n = model.module.head.num_classes
        names = [str(x) for x in label_names] if label_names is not None else [f"LABEL_{i}" for i in range(n)]
        if len(names) != n:
            raise SaveError(f"{len(names)} label names for a {n}-output head")
        updates.update(id2label=dict(enumerate(names)), label2id={x: i for i, x in enumerate(names)},
                       problem_type=PROBLEM_TYPES[getattr(model.module.head, "task", "classification")])
    if isinstance(config, Mapping):
        out = {**config, **updates}
        if "id2label" in updates:
            out["id2label"] = {str(k): v for k, v in updates["id2label"].items()}
        return out
    for k, v in updates.items():
        setattr(config, k, v)
    return config


def _copy_preprocessing(model, directory: str, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        return
    source = model.source
    if source is None:
        return
    folder = source if source.is_dir() else source.parent
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        model.tokenizer().save_pretrained(directory)
    elif (folder / "preprocessor_config.json").exists():
        model.processor().save_pretrained(directory)


def save(model, directory: str | os.PathLike, params: Any = None, *,
         label_names: Sequence[str] | None = None, tokenizer: Any = None) -> str:
    """Write ``model`` (with ``params``: a params tree or full variables; default its own)
    to ``directory`` in the Hugging Face layout (see the module docstring)."""
    from safetensors.numpy import save_file

    weights, arch = state_dict(model, params)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    has_pooler = any(".pooler." in k or k.startswith("pooler.") for k in weights)
    config = _config(model, arch, label_names, has_pooler)
    save_file({k: np.asarray(v, order="C") for k, v in weights.items()},  # (ascontiguousarray makes 0-d 1-d)
              os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    if isinstance(config, Mapping):
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    else:
        config.save_pretrained(directory)
    _copy_preprocessing(model, directory, tokenizer)
    return directory

"""A trained run's workdir -> what you ship: a predictor, a serving export, a CSV of predictions.

    trained = deploy.restore(cfg, "runs/top2")       # best (or latest) checkpoint + inference spec
    deploy.predictor(trained)(["what a lovely day"])   # see jaxfer.inference.Predictor
    deploy.export(trained, "runs/top2/export", "stablehlo")   # or "onnx", "hf"

At train time :func:`save_spec` writes ``workdir/inference/``: the
:class:`~jaxfer.inference.Spec` (preprocessing, label names, problem type) and
the tokenizer's files, so predicting, serving and exporting read the model's
preprocessing from the workdir, not from the data or the model's source (a run
made before this existed falls back to the recipe and the model's source).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax

from jaxfer import workdir as workdir_lib
from jaxfer.inference import DEFAULT_BATCH_SIZES, SPEC_DIR, SPEC_FILE, Predictor, Spec, load_tokenizer

FORMATS = ("stablehlo", "onnx", "savedmodel", "hf")


@dataclasses.dataclass
class Trained:
    """A trained model ready for inference: ``variables = {"params": ..., **model_state}``;
    ``apply_fn`` (the step contract) when the plain model does not run them (adapters)."""

    model: Any
    variables: dict[str, Any]
    spec: Spec
    tokenizer: Any = None
    apply_fn: Any = None

    def apply(self):
        from jaxfer.train.step import model_apply

        return self.apply_fn or model_apply(self.model)


def inference_form(run, params) -> tuple[Any, Any]:
    """``(apply_fn or None, params)`` that predict as the run's eval step does, without its
    training-only parts: LoRA merged, a teacher copy dropped; adapters stay (they are not
    linear), run by their wrapped apply_fn."""
    peft = run.peft
    if peft is None:
        return None, params
    if peft.adapters is None:
        return None, peft.inference_params(params)
    from jaxfer.train.step import model_apply
    from jaxfer.transfer import adapters as adapters_lib, lora as lora_lib
    from jaxfer.transfer.regularizers import TEACHER

    params = {k: v for k, v in params.items() if k != TEACHER}
    if peft.lora is not None:
        params = lora_lib.merge(params, peft.lora)
    return adapters_lib.wrap(model_apply(run.model), peft.adapters), params


def spec_dir(workdir: str) -> str:
    return os.path.join(workdir, SPEC_DIR)


def save_spec(workdir: str, cfg, model, label_names: Sequence[str] | None,
              task: str = "classification") -> str | None:
    """``workdir/inference/``: ``inference.json`` and, for text, the tokenizer (process 0 writes)."""
    if jax.process_index() != 0:
        return None
    spec = Spec.from_config(cfg, label_names, task, model.preprocessing())
    tokenizer = model.tokenizer() if spec.kind == "text" else None
    return spec.save(spec_dir(workdir), tokenizer)


def load_spec(cfg, workdir: str, model, task: str) -> tuple[Spec, Any]:
    """The workdir's saved spec and tokenizer, else the recipe's and the model source's."""
    folder = spec_dir(workdir)
    if workdir_lib.exists(workdir_lib.path(folder) / SPEC_FILE):
        spec = Spec.load(folder)
        if spec.kind != "text":
            return spec, None
        with workdir_lib.local_copy(folder) as local:
            return spec, load_tokenizer(local)
    spec = Spec.from_config(cfg, task=task, preprocessing=model.preprocessing())
    return spec, (model.tokenizer() if spec.kind == "text" else None)


def restore(cfg, workdir: str) -> Trained:
    """The workdir's best checkpoint (latest without evaluations), on this host."""
    from jaxfer import experiment

    run = experiment.restore_trained(cfg, workdir, with_data=False)
    state = jax.device_get(run.state) if jax.process_count() == 1 else run.state
    apply_fn, params = inference_form(run, state.params)
    variables = {"params": params, **state.model_state}
    spec, tokenizer = load_spec(cfg, workdir, run.model, cfg.task)
    return Trained(run.model, variables, spec, tokenizer, apply_fn)


def predictor(trained: Trained, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> Predictor:
    return Predictor.from_model(trained.model, trained.variables, trained.spec,
                                tokenizer=trained.tokenizer, batch_sizes=batch_sizes, apply_fn=trained.apply())


def export(trained: Trained, out: str, format: str = "stablehlo", *,
           platforms: Sequence[str] | None = None) -> str:
    """Write a serving export of ``trained`` (see :mod:`jaxfer.export`); returns its path.

    ``stablehlo``: the folder ``out`` (with the tokenizer, so ``jaxfer serve --export out``
    needs nothing else); ``onnx``: the file ``out`` (``.onnx`` added if missing);
    ``savedmodel``: a TensorFlow SavedModel folder (``jaxfer[savedmodel]``); ``hf``:
    the folder ``out`` in the Hugging Face layout (:func:`jaxfer.weights.save.save`).
    """
    from jaxfer import export as export_lib

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")
    if format == "hf":
        from jaxfer.weights.save import SaveError, save

        if trained.apply_fn is not None:
            raise SaveError("this run's adapters add modules Hugging Face's classes lack; "
                            "export it for serving (--format stablehlo / onnx) instead")

        return save(trained.model, out, trained.variables, label_names=trained.spec.label_names,
                    tokenizer=trained.tokenizer)
    example = Predictor(lambda x: x, trained.spec, trained.tokenizer).example_inputs(2)
    apply_fn = trained.apply()
    if format == "savedmodel":
        return export_lib.saved_model(out, apply_fn, trained.variables, example, task=trained.spec.task)
    if format == "onnx":
        path = out if out.endswith(".onnx") else out + ".onnx"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return export_lib.onnx(path, apply_fn, trained.variables, example,
                               task=trained.spec.task)
    folder = export_lib.stablehlo(out, apply_fn, trained.variables, example,
                                  task=trained.spec.task,
                                  label_names=trained.spec.label_names,
                                  preprocessing=trained.spec.preprocessing, platforms=platforms)
    if trained.tokenizer is not None:
        trained.tokenizer.save_pretrained(folder)
    return folder

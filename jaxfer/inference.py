"""Raw texts or images -> class probabilities, in padded batches.

What predicting on files (:mod:`jaxfer.predict_files`), the HTTP server
(:mod:`jaxfer.serve`) and a serving export share::

    predictor = Predictor.from_model(model, variables, spec, tokenizer=model.tokenizer())
    predictor = Predictor.from_export("export_dir")   # a jaxfer.export.stablehlo folder
    predictor(["what a lovely day", "meh"])           # {"logits": (2, C), "probs": (2, C)}
    predictor.rows(["what a lovely day"])             # [{"label": "positive", "probs": {...}}]

A :class:`Spec` says how raw data becomes model inputs and what the outputs
mean; a training run writes it (with the tokenizer) into ``workdir/inference/``
so that prediction needs nothing but the workdir::

    {"preprocessing": {"kind": "text", "max_length": 48, "text": "text"},
     "label_names": ["negative", "neutral", "positive"], "task": "classification"}
    {"preprocessing": {"kind": "image", "image_size": 224, "image_options": {"mean": [...], ...}}, ...}

Text is tokenised to ``max_length`` (padded, truncated); an image (a path, file
bytes, a PIL image or an HWC uint8 array) goes through the evaluation transform
:func:`jaxfer.data.image_transform`. Batches: the items are cut into chunks of
``max(batch_sizes)`` and each chunk is padded to the smallest of ``batch_sizes``
that holds it, so a long-running server compiles ``len(batch_sizes)`` programs,
not one per batch size it happens to form.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SPEC_DIR = "inference"
SPEC_FILE = "inference.json"
KINDS = ("text", "image")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Spec:
    """How raw data becomes inputs (``preprocessing``) and what the outputs mean."""

    preprocessing: Mapping[str, Any]
    label_names: tuple[str, ...] | None = None
    task: str = "classification"

    def __post_init__(self):
        kind = self.preprocessing.get("kind")
        if kind not in KINDS:
            raise ValueError(f"preprocessing kind {kind!r}; choose one of {KINDS}")

    @property
    def kind(self) -> str:
        return self.preprocessing["kind"]

    def to_json(self) -> dict[str, Any]:
        return {"preprocessing": _jsonable(self.preprocessing),
                "label_names": list(self.label_names) if self.label_names else None,
                "task": self.task}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Spec":
        names = d.get("label_names")
        return cls(dict(d["preprocessing"]), tuple(names) if names else None,
                   d.get("task", "classification"))

    @classmethod
    def from_config(cls, cfg, label_names: Sequence[str] | None = None,
                    task: str = "classification", preprocessing: Mapping[str, Any] | None = None) -> "Spec":
        """From a recipe's ``data`` section: ``image_size`` makes it an image recipe,
        else a text one (``max_length``, ``text``). ``preprocessing``: the model's own
        (``Model.preprocessing()``), which the recipe's ``image_options`` refine."""
        d = cfg.data
        if d.get("image_size"):
            from jaxfer.data.image import transform_options

            size, options = transform_options(preprocessing, d.image_size, d.get("image_options", {}) or {})
            pre = {"kind": "image", "image_size": size, "image_options": options}
        else:
            pre = {"kind": "text", "max_length": int(d.max_length), "text": d.get("text", "text")}
        names = label_names or (tuple(d.label_names) if d.get("label_names") else None)
        return cls(pre, tuple(map(str, names)) if names else None, task)

    def save(self, directory: str | os.PathLike, tokenizer: Any = None) -> str:
        """``directory/inference.json`` (+ the tokenizer's files beside it, for text);
        ``directory`` may be on any scheme :mod:`jaxfer.workdir` speaks."""
        from jaxfer import workdir as workdir_lib

        directory = os.fspath(directory)
        workdir_lib.makedirs(directory)
        if tokenizer is not None:
            with workdir_lib.local_copy(directory, upload=True) as local:
                tokenizer.save_pretrained(local)
        workdir_lib.write_json(workdir_lib.path(directory) / SPEC_FILE, self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Spec":
        from jaxfer import workdir as workdir_lib

        return cls.from_json(workdir_lib.read_json(workdir_lib.path(directory) / SPEC_FILE))


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def load_tokenizer(directory: str | os.PathLike):
    from jaxfer.data.text import load_tokenizer as load

    return load(os.fspath(directory))


def decode_image(item: Any):
    """A path, file bytes, a PIL image or an HWC array -> an RGB PIL image (errors name the item)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (bytes, bytearray)):
        with Image.open(io.BytesIO(item)) as im:
            return im.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        with Image.open(os.fspath(item)) as im:
            return im.convert("RGB")
    from jaxfer.data.image import _pil

    return _pil(item)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` rows (``n`` itself beyond the largest)."""
    return next((s for s in sorted(sizes) if s >= n), n)


@dataclasses.dataclass
class Predictor:
    """``predictor(items) -> {"logits", "probs"}`` for raw texts or images (module docstring).

    Attributes:
      fn: model inputs ``{name: (B, ...) array}`` -> outputs ``{"logits", "probs"}`` (numpy).
      spec: preprocessing, label names, task kind.
      tokenizer: for text (``None`` for images).
      batch_sizes: the padded batch sizes (see the module docstring).
    """

    fn: Callable[[dict[str, np.ndarray]], Mapping[str, Any]]
    spec: Spec
    tokenizer: Any = None
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES

    def __post_init__(self):
        if self.spec.kind == "text" and self.tokenizer is None:
            raise ValueError("a text predictor needs a tokenizer")
        self.batch_sizes = tuple(sorted(int(b) for b in self.batch_sizes))
        self._transform = None
        if self.spec.kind == "image":
            from jaxfer.data.image import image_transform

            pre = self.spec.preprocessing
            self._transform = image_transform(int(pre["image_size"]), train=False,
                                              **dict(pre.get("image_options") or {}))

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def label_names(self) -> tuple[str, ...] | None:
        return self.spec.label_names

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    # ------------------------------------------------------------ inputs
    def inputs(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """Raw items -> model inputs (``input_ids``/``attention_mask``/``token_type_ids`` or
        ``pixel_values``), one row per item."""
        if self.kind == "text":
            from jaxfer.data.text import tokenize_texts

            bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
            if bad:
                raise TypeError(f"text items must be strings; item {bad[0]} is {type(items[bad[0]]).__name__}")
            return tokenize_texts(list(items), self.tokenizer, int(self.spec.preprocessing["max_length"]))
        rng = np.random.default_rng(0)  # unused by the evaluation transform
        pixels = [self._transform({"image": decode_image(x)}, rng)["pixel_values"] for x in items]
        return {"pixel_values": np.stack(pixels)}

    def example_inputs(self, n: int = 1) -> dict[str, np.ndarray]:
        """Inputs of ``n`` placeholder items (an empty text, a black image)."""
        if self.kind == "text":
            return self.inputs([""] * n)
        size = int(self.spec.preprocessing["image_size"])
        return self.inputs([np.zeros((size, size, 3), np.uint8)] * n)

    # ----------------------------------------------------------- outputs
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs of any batch size -> outputs, in padded chunks (module docstring)."""
        n = len(next(iter(inputs.values())))
        if n == 0:
            raise ValueError("nothing to predict: no items")
        chunks = []
        for lo in range(0, n, self.max_batch_size):
            part = {k: v[lo:lo + self.max_batch_size] for k, v in inputs.items()}
            m = len(next(iter(part.values())))
            size = bucket(m, self.batch_sizes)
            if size > m:
                part = {k: np.concatenate([v, np.repeat(v[-1:], size - m, 0)]) for k, v in part.items()}
            out = self.fn(part)
            chunks.append({k: np.asarray(v)[:m] for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def __call__(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.run(self.inputs(items))

    def names(self, num_outputs: int) -> tuple[str, ...]:
        return self.label_names or tuple(str(i) for i in range(num_outputs))

    def rows(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        """One ``{"label", "probs": {name: p}}`` per item (``{"values": [...]}`` for regression)."""
        return self.to_rows(self(items))

    def to_rows(self, outputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        if "probs" not in outputs:
            return [{"values": [float(v) for v in row]} for row in outputs["logits"]]
        probs = outputs["probs"]
        names = self.names(probs.shape[-1])
        rows = []
        for p in probs:
            row: dict[str, Any] = {"probs": {n: float(q) for n, q in zip(names, p)}}
            if self.spec.task == "multi_label":
                row["labels"] = [n for n, q in zip(names, p) if q >= 0.5]
            else:
                row["label"] = names[int(np.argmax(p))]
            rows.append(row)
        return rows

    # ----------------------------------------------------------- builders
    @classmethod
    def from_model(cls, model, variables: Mapping[str, Any], spec: Spec, *, tokenizer: Any = None,
                   batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, apply_fn=None) -> "Predictor":
        """The live model (a loaded :class:`jaxfer.Model`) with ``variables``, jit-compiled
        (through ``apply_fn``, the step contract, when given: e.g. adapters wrapped around it)."""
        import jax

        from jaxfer import export
        from jaxfer.train.step import model_apply

        fn = jax.jit(export.inference_fn(apply_fn or model_apply(model), spec.task))
        flat = jax.device_put(export.flat_variables(variables))
        return cls(lambda inputs: fn(flat, inputs), spec, tokenizer, tuple(batch_sizes))

    @classmethod
    def from_export(cls, directory: str | os.PathLike, *,
                    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> "Predictor":
        """A :func:`jaxfer.export.stablehlo` folder (its tokenizer files beside it)."""
        from jaxfer import exported

        model = exported.load(directory)
        sig = model.signature
        spec = Spec(sig["preprocessing"], model.label_names, sig.get("task", "classification"))
        tok = load_tokenizer(directory) if spec.kind == "text" else None
        names = model.input_names
        return cls(lambda inputs: model(**{k: inputs[k] for k in names}), spec, tok, tuple(batch_sizes))

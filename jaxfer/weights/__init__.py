"""Pretrained weights: sources, readers, strict loading and surgery.

Key maps (checkpoint names -> param paths) live beside the models, in
:mod:`jaxfer.models.keymap`; ``KeyRule`` & co. are re-exported here.

``load(source, head=None, reinit=[...])`` is the entry point; see :mod:`jaxfer.weights.load`
(``init_model(config)``: the same model with random weights, to train from scratch).
"""

from jaxfer.errors import WeightsError
from jaxfer.models.keymap import KeyRule, Transform, apply_key_map, batch_norm, generic_rules
from jaxfer.weights import readers, sources, strict, surgery
from jaxfer.weights.load import Model, init_model, load
from jaxfer.weights.strict import LoadError, LoadReport
from jaxfer.weights.readers import write_msgpack, write_npz

__all__ = [
    "readers", "sources", "strict", "surgery",
    "KeyRule", "Transform", "apply_key_map", "batch_norm", "generic_rules",
    "Model", "init_model", "load", "LoadError", "LoadReport", "WeightsError", "write_msgpack", "write_npz",
]

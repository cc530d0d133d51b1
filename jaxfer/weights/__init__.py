"""Pretrained weights: sources, readers, key maps, strict loading and surgery.

``load(source, head=None, reinit=[...])`` is the entry point; see :mod:`jaxfer.weights.load`.
"""

from jaxfer.weights import keymap, readers, sources, surgery
from jaxfer.weights.keymap import Rule, apply_key_map, batch_norm, generic_rules
from jaxfer.weights.load import Model, load
from jaxfer.weights.merge import LoadError, LoadReport
from jaxfer.weights.readers import CheckpointError, write_msgpack, write_npz

__all__ = [
    "keymap", "readers", "sources", "surgery",
    "Rule", "apply_key_map", "batch_norm", "generic_rules",
    "Model", "load", "LoadError", "LoadReport", "CheckpointError", "write_msgpack", "write_npz",
]

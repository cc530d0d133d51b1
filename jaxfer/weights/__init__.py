"""Pretrained weights: sources, readers, key maps, strict loading and surgery."""

from jaxfer.weights import keymap
from jaxfer.weights.keymap import Rule, apply_key_map, batch_norm

__all__ = ["keymap", "Rule", "apply_key_map", "batch_norm"]

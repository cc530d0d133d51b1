"""Model families (one file each, registered by HF ``model_type``), the parts they share
(:mod:`~jaxfer.models.common`), the key-map engine (:mod:`~jaxfer.models.keymap`) and task heads."""

from jaxfer.models import common, heads, keymap, registry
from jaxfer.models.heads import Classifier, TaskModel, TokenClassifier

__all__ = ["common", "heads", "keymap", "registry", "Classifier", "TaskModel", "TokenClassifier"]

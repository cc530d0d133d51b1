"""Model families (one file each, registered by HF ``model_type``) and task heads."""

from jaxfer.models import heads, registry
from jaxfer.models.heads import Classifier, TaskModel, TokenClassifier

__all__ = ["heads", "registry", "Classifier", "TaskModel", "TokenClassifier"]

"""jaxfer: functional transfer learning for JAX and Flax.

    import jaxfer as jf
    jf.reuse_host_memory()  # on CPUs, before any computation: see jaxfer.train.hostmem

    model = jf.load("path/or/hub-id", head=jf.heads.Classifier(num_classes=3))
    rules = [("classifier/**", 1.0), ("bert/encoder/layer/[45]/**", 0.5), ("**", None)]
    print(jf.explain(model.params, rules))
    tx = jf.optim.build(optax.adamw(3e-4), rules)
    step = jf.make_train_step(jf.model_apply(model), jf.losses.softmax_cross_entropy(),
                              tx, jf.masks.trainable_mask(model.params, rules))
    state, history = jf.fit(jf.TrainState.create(model.params, tx, model_state=model.state),
                            step, train_batches, steps=1000)

See the README for the tour and ``jaxfer train --config ...`` for recipes.
"""

from jaxfer import config, data, deploy, export, generation, masks, metrics, optim, tasks, tree
from jaxfer.generation import generate
from jaxfer.param_table import explain
from jaxfer.models import heads
from jaxfer.models.feature_maps import feature_maps
from jaxfer.train import checkpoint, losses, parallel
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.hostmem import reuse_host_memory
from jaxfer.train.loop import evaluate, fit, predict
from jaxfer.train.state import TrainState
from jaxfer.train.step import linen_apply, make_eval_step, make_train_step, model_apply
from jaxfer.weights import surgery
from jaxfer.weights.load import Model, init_model, load
from jaxfer.weights.save import save

__all__ = [
    "Checkpointer", "Model", "TrainState", "checkpoint", "config", "data", "deploy", "evaluate", "explain",
    "export", "feature_maps", "fit", "generate", "generation", "heads", "init_model", "linen_apply", "load",
    "losses", "make_eval_step", "make_train_step", "masks", "metrics", "model_apply", "optim", "parallel", "predict",
    "reuse_host_memory", "save", "surgery", "tasks", "tree",
]
__version__ = "0.1.0"

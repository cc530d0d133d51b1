"""Training: the state, the step builders and the losses they reduce.

``loop``, ``checkpoint`` and ``parallel`` are imported by name
(``from jaxfer.train import loop``) so that importing the step stays light.
"""

from jaxfer.train import losses
from jaxfer.train.state import TrainState
from jaxfer.train.step import linen_apply, make_eval_step, make_train_step, model_apply

__all__ = ["TrainState", "linen_apply", "losses", "make_eval_step", "make_train_step", "model_apply"]

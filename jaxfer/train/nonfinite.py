"""Non-finite training seen from the loop: which steps the step's guard skipped, and when to stop.

The train step (:func:`jaxfer.make_train_step`) never applies a non-finite
update: it keeps the old state and reports ``metrics["nonfinite"] = 1``.
:class:`NonFiniteWatch` reads those flags when the loop fetches metrics anyway
(so it never waits on every step) and says when too many came in a row.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from jaxfer.errors import ConfigError
from jaxfer.train.runlog import scalars

logger = logging.getLogger(__name__)


def finite_report(report: dict) -> bool:
    """Every scalar of an eval report is finite (NaN logits can still give a finite accuracy)."""
    return all(math.isfinite(v) for v in scalars(report).values())


class NonFiniteWatch:
    """Counts the steps the guard skipped, from ``metrics["nonfinite"]`` fetched lazily.

    Steps without that metric (a ``train_step`` built without the guard) count
    as non-finite when their ``loss`` is not finite, and stop the run at once:
    their state may already hold the NaN.
    """

    def __init__(self, limit: int):
        if limit < 0:
            raise ConfigError(f"max_nonfinite_skips must be >= 0, got {limit}")
        self.limit, self.pending, self.run = limit, [], []

    def add(self, step: int, metrics: dict) -> None:
        if "nonfinite" in metrics:
            self.pending.append((step, True, metrics["nonfinite"]))
        elif "loss" in metrics:
            self.pending.append((step, False, metrics["loss"]))

    def check(self) -> str | None:
        """``None``, or why the run must stop now."""
        values = jax.device_get([v for _, _, v in self.pending])
        pending, self.pending = self.pending, []
        for (step, guarded, _), value in zip(pending, values):
            bad = float(np.max(value)) > 0 if guarded else not np.all(np.isfinite(value))
            if not bad:
                self.run = []
                continue
            self.run.append(step)
            if not guarded:
                return (f"step {step} gave a non-finite loss and this train_step has no "
                        "non-finite guard (jaxfer.make_train_step has one), so its state may "
                        "hold NaN: stopped without saving it")
            if len(self.run) > self.limit:
                steps = f"steps {self.run[0]} to {step}" if len(self.run) > 1 else f"step {step}"
                return (f"non-finite loss, gradients or model state at {steps} ({len(self.run)} "
                        f"in a row, more than max_nonfinite_skips={self.limit}); each was "
                        f"skipped, so the parameters are those after step {self.run[0] - 1}. "
                        "Lower the learning rate, clip gradients, or check the data for "
                        "inf/NaN inputs and labels outside [0, num_classes)")
            logger.warning("step %d: non-finite loss, gradients or model state; update skipped "
                           "(%d in a row, at most %d)", step, len(self.run), self.limit)
        return None

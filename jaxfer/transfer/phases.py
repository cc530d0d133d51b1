"""Training in phases: each phase its own rules (what trains, at which lr), one compile each.

A run of ``T`` steps is cut into phases ``p = 0..P-1`` covering steps
``[start_p, end_p)``. Phase ``p`` trains with its own rules ``R_p`` and learning
rate ``lr_p``: its optimizer ``tx_p = optim.build(opt(schedule_p), R_p)`` holds
state for the leaves ``R_p`` makes trainable, and its step is compiled once.
At a phase change the optimizer state is carried over *by path*: a leaf
trainable in both phases keeps its moments, a newly trainable leaf starts from
zeros, and step counters (the schedule's and Adam's bias correction) go on
counting the run's steps. ``schedule_p(t)`` is the recipe's schedule over the
phase's own length, read at ``t - start_p`` (or, for ``schedule="run"``, the
recipe's schedule over the whole run).

Two classic recipes are phase lists:

* LP-FT (Kumar et al., 2022): ``[head only, lr_probe; everything, lr_ft]`` --
  fine-tuning starts from a trained head, so the backbone's features are not
  distorted by a random one (``jaxfer`` also fits that head by L-BFGS on cached
  features: ``transfer.probe`` with rules that train more than the head);
* gradual unfreezing (ULMFiT, Howard & Ruder, 2018): :func:`unfreezing` --
  the head first, then one more layer from the top every ``k`` steps, and the
  embeddings last.

:class:`PhasedStep` is a train step for ``jaxfer.fit``: it finds the phase of
each step, switches optimizer state and compiled step at phase boundaries, and
resumes mid-phase from a checkpoint restored onto :meth:`PhasedStep.template`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxfer import masks, tree

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` of a run trained with ``rules`` at learning rate ``lr``."""

    name: str
    start: int
    end: int
    rules: tuple
    lr: float
    schedule: str = "phase"  # "phase": the recipe's schedule over this phase; "run": over the whole run

    @property
    def steps(self) -> int:
        return self.end - self.start


def from_specs(specs: Sequence[Mapping[str, Any]], total_steps: int, *, default_lr: float) -> list[Phase]:
    """Phases from specs ``{"name", "steps" or "fraction", "rules", "lr"}`` in order.

    ``fraction`` is of ``total_steps``; the last phase takes whatever is left
    (its own ``steps``/``fraction`` may be left out). ``lr`` defaults to ``default_lr``.
    """
    if not specs:
        raise ValueError("phases need at least one phase")
    phases, start = [], 0
    for i, spec in enumerate(specs):
        unknown = set(spec) - {"name", "steps", "fraction", "rules", "lr"}
        if unknown:
            raise ValueError(f"phase {i}: unknown keys {sorted(unknown)}; a phase has name, steps or "
                             "fraction, rules, lr")
        if "rules" not in spec:
            raise ValueError(f"phase {i} ({spec.get('name', '?')}): no rules")
        last = i == len(specs) - 1
        if "steps" in spec and "fraction" in spec:
            raise ValueError(f"phase {i}: give steps or fraction, not both")
        if last:
            end = total_steps
        elif "steps" in spec:
            end = start + int(spec["steps"])
        elif "fraction" in spec:
            end = start + round(float(spec["fraction"]) * total_steps)
        else:
            raise ValueError(f"phase {i}: give its length as steps or fraction (only the last may omit it)")
        if end <= start or end > total_steps:
            raise ValueError(f"phase {i} ({spec.get('name', i)}) would cover steps [{start}, {end}) of a "
                             f"{total_steps}-step run")
        phases.append(Phase(str(spec.get("name", f"phase{i}")), start, end, tuple(map(tuple, spec["rules"])),
                            float(spec.get("lr", default_lr))))
        start = end
    return phases


def unfreezing(rules: Sequence, *, every: int, total_steps: int, num_layers: int, layer_pattern: str,
               backbone: str, lr: float) -> list[Phase]:
    """ULMFiT-style gradual unfreezing toward the recipe's ``rules``.

    Phase ``i`` (``i = 0..L``, every ``every`` steps) freezes the backbone except its top
    ``i`` layers (``backbone/**`` and not ``layers(L - i, L)``, first match) and
    otherwise follows ``rules``; the final phase is ``rules`` itself (embeddings
    and anything else in the backbone join last) and runs to the end. Phases
    past ``total_steps`` are dropped.
    """
    if every < 1:
        raise ValueError(f"unfreezing needs every >= 1 step, got {every}")
    rules = tuple(map(tuple, rules))
    specs, start = [], 0
    for i in range(num_layers + 1):
        if start + every >= total_steps:
            break
        below = masks.glob(f"{backbone}/**")
        if i:
            below = below & ~masks.layers(num_layers - i, num_layers, pattern=layer_pattern)
        name = "head" if i == 0 else f"top{i}"
        specs.append({"name": name, "steps": every, "rules": ((below, None),) + rules, "lr": lr})
        start += every
    specs.append({"name": "all", "rules": rules, "lr": lr})
    return [dataclasses.replace(p, schedule="run") for p in from_specs(specs, total_steps, default_lr=lr)]


def phase_at(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase that runs the step after ``step`` steps (the last one at the end)."""
    for i, p in enumerate(phases):
        if step < p.end:
            return i
    return len(phases) - 1


def phase_of_checkpoint(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase whose optimizer state a checkpoint at ``step`` holds (it ran step ``step``)."""
    return phase_at(phases, max(step - 1, 0))


def carry_over(old: PyTree, new: PyTree) -> PyTree:
    """``new`` with every leaf whose path (and shape) ``old`` also has taken from ``old``."""
    flat_old = tree.flatten(old)

    def pick(path, leaf):
        value = flat_old.get(path)
        return value if value is not None and jnp.shape(value) == jnp.shape(leaf) else leaf

    return tree.map_with_path(pick, new)


class PhasedStep:
    """``step(state, batch) -> (state, metrics)`` that runs each step in its phase.

    Args:
      phases: the run's phases, in order, covering ``[0, T)``.
      txs: each phase's optimizer (over the full params tree).
      steps: each phase's train step (built with its ``tx`` and trainable mask).
      places: each phase's ``state -> state`` placement (shardings), applied on
        entering it.

    The step count is read from the state once (on the first call), then
    counted on the host, so the loop never waits on the device for it. The
    metrics gain ``phase`` (its index).
    """

    def __init__(self, phases: Sequence[Phase], txs: Sequence[Any], steps: Sequence[Callable],
                 places: Sequence[Callable] | None = None):
        if not (len(phases) == len(txs) == len(steps)):
            raise ValueError("one optimizer and one step per phase")
        self.phases, self.txs, self.steps = list(phases), list(txs), list(steps)
        self.places = list(places) if places is not None else [lambda s: s] * len(phases)
        self._step: int | None = None
        self._current: int | None = None

    def template(self, state, step: int):
        """``state`` with the optimizer state of the phase that wrote a checkpoint at ``step``
        (the restore template for it)."""
        p = phase_of_checkpoint(self.phases, step)
        return self.places[p](state.replace(opt_state=self.txs[p].init(state.params)))

    def enter(self, state, p: int):
        """``state`` moved into phase ``p``: its optimizer state, carried over by path."""
        new = self.txs[p].init(state.params)
        if jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state.opt_state):
            return state
        return self.places[p](state.replace(opt_state=carry_over(state.opt_state, new)))

    def __call__(self, state, batch):
        if self._step is None:
            self._step = int(jax.device_get(jnp.ravel(state.step)[0]))
        p = phase_at(self.phases, self._step)
        if p != self._current:
            state = self.enter(state, p)
            self._current = p
        state, metrics = self.steps[p](state, batch)
        self._step += 1
        return state, {**metrics, "phase": jnp.asarray(p, jnp.float32)}


def union_trainable(masks_: Sequence[PyTree]) -> PyTree:
    """Leaves trainable in any phase (what a trainable-only checkpoint must hold)."""
    return jax.tree_util.tree_map(lambda *xs: any(bool(x) for x in xs), *masks_)

"""A tiny MLP classification task for the loop tests.

Imported, it offers :func:`make_task`. Run as a script, it trains in a workdir
and, with ``--kill-at K``, SIGKILLs itself right after the checkpoint of step K
is on disk (``--signal-at K:TERM`` sends itself SIGTERM there instead, and exits
as the CLI does: ``128 + signum``; ``--fault K:PHASE`` SIGKILLs it at one of
:data:`PHASES` of step K); run again without it, the run resumes and saves its
final params to ``workdir/final_params.npz``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfer import tree
from jaxfer.data.iterators import EvalBatches, TrainIterator
from jaxfer.data.sources import from_arrays
from jaxfer.errors import Preempted
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.loop import fit
from jaxfer.train.state import TrainState

CLASSES, FEATURES, BATCH = 3, 8, 8
LABEL_NAMES = ("a", "b", "c")


class MLP(nn.Module):
    """Dense -> relu -> dropout -> Dense, so the rng in the state matters."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(CLASSES)(x)


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Three Gaussian blobs in 8 dimensions (fixed centres, ``seed`` draws the points)."""
    centres = np.random.default_rng(123).normal(size=(CLASSES, FEATURES)) * 1.5
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, n).astype(np.int32)
    x = (centres[label] + rng.normal(size=(n, FEATURES))).astype(np.float32)
    return {"x": x, "label": label}


def make_task(lr: float = 0.03, seed: int = 0, n_train: int = 96, n_eval: int = 37):
    """``(state, train_step, eval_step, train_iter, eval_batches)`` following the loop contract."""
    model, tx = MLP(), optax.adam(lr)

    @jax.jit  # one compile instead of dozens of eager ones
    def init_state():
        params = model.init(jax.random.key(seed), jnp.zeros((1, FEATURES)), train=False)["params"]
        return TrainState.create(params, tx, rng=jax.random.key(seed))

    state = init_state()

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return (losses * batch["mask"]).sum() / batch["mask"].sum()

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        rng, step_rng = jax.random.split(state.rng)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, rng=rng)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                       "lr": jnp.float32(lr), "examples": batch["mask"].sum()}

    @jax.jit
    def eval_step(state, batch):
        logits = model.apply({"params": state.params}, batch["x"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"loss": loss, "weight": jnp.ones_like(loss), "logits": logits,
                "label": batch["label"], "mask": batch["mask"]}

    train_iter = TrainIterator(from_arrays(make_data(n_train, 1)), BATCH, seed=seed)
    eval_batches = EvalBatches(from_arrays(make_data(n_eval, 2)), BATCH)
    return state, train_step, eval_step, train_iter, eval_batches


# where a run can die, in the order they happen within a step of fit()
PHASES = ("before_step", "mid_log", "eval", "save_item", "save_commit", "after_step")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(fault: str, train_step, eval_step, hooks):
    """SIGKILL this process at ``"STEP:PHASE"``: before the step runs, half-way through
    writing its metrics.jsonl line, during its evaluation, after a checkpoint item is
    written but before the step's checkpoint commits (``save_item``), just before the
    commit rename (``save_commit``), or after everything of the step."""
    step, phase = fault.split(":")
    step = int(step)
    if phase == "before_step":
        def train_step(state, batch, inner=train_step):
            if int(state.step) + 1 == step:
                _die()
            return inner(state, batch)
    elif phase == "eval":
        def eval_step(state, batch, inner=eval_step):
            if int(state.step) == step:
                _die()
            return inner(state, batch)
    elif phase == "mid_log":
        from jaxfer import workdir as workdir_lib

        def append(self, record, inner=workdir_lib.JsonLines.append):
            if record.get("step") == step and self._file is not None:
                line = json.dumps(record) + "\n"
                self._file.write(line[: len(line) // 2])  # a torn line on disk
                self._file.flush()
                _die()
            return inner(self, record)

        workdir_lib.JsonLines.append = append
    elif phase in ("save_item", "save_commit"):
        from orbax.checkpoint._src.path import atomicity

        inner = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *args, **kwargs):
            final, tmp = self._final_path, self._tmp_path
            if phase == "save_commit" and final.name == str(step):
                _die()
            if phase == "save_item" and tmp.parent.name.startswith(f"{step}."):
                _die()  # this item's files are written, the step is not committed
            return await inner(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif phase == "after_step":
        hooks = [*hooks, lambda s, state, records: _die() if s == step else None]
    else:
        raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")
    return train_step, eval_step, hooks


def train(workdir: str | None, steps: int, every: int, hooks=(), checkpointer=None,
          fault: str | None = None):
    """The run the resume test repeats: eval and checkpoint every ``every`` steps."""
    state, train_step, eval_step, train_iter, eval_batches = make_task()
    if fault:
        train_step, eval_step, hooks = arm(fault, train_step, eval_step, hooks)
    return fit(state, train_step, train_iter, steps=steps, eval_step=eval_step,
               eval_batches=eval_batches, eval_every=every, label_names=LABEL_NAMES,
               workdir=workdir, checkpointer=checkpointer, checkpoint_every=every,
               log_every=5, progress=False, hooks=hooks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--signal-at", default=None, help="STEP:TERM or STEP:INT")
    parser.add_argument("--fault", default=None, help=f"STEP:PHASE, PHASE one of {PHASES}")
    args = parser.parse_args()
    checkpointer = Checkpointer(args.workdir, keep=2)
    signal_step, signal_name = (args.signal_at or ":").split(":")

    def kill_after_checkpoint(step, state, records):
        if step == args.kill_at:
            checkpointer.wait()  # the step's checkpoint is committed; now die hard
            os.kill(os.getpid(), signal.SIGKILL)
        if signal_step and step == int(signal_step):
            os.kill(os.getpid(), getattr(signal, "SIG" + signal_name))

    try:
        state, _ = train(args.workdir, args.steps, args.every, hooks=[kill_after_checkpoint],
                         checkpointer=checkpointer, fault=args.fault)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    checkpointer.close()
    np.savez(os.path.join(args.workdir, "final_params.npz"),
             **tree.flatten(jax.device_get(state.params)))


if __name__ == "__main__":
    # tensorboardX imports torch when it can (~2 s); this script has no use for it
    sys.modules.setdefault("torch", None)
    main()

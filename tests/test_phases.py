"""Training in phases: each phase's rules, optimizer state carried over by path, one compile
per phase, resumable mid-phase with the same result as an uninterrupted run."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxfer import data, masks, optim, tree
from jaxfer import Checkpointer, TrainState, fit, linen_apply, losses, make_train_step
from jaxfer.transfer import phases


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for i in range(3):
            x = nn.relu(nn.Dense(8, name=f"backbone/encoder/layer/{i}".replace("/", "_"))(x))
        return nn.Dense(3, name="classifier")(x)


def _setup():
    r = np.random.default_rng(0)
    src = data.from_arrays({"x": r.normal(size=(64, 4)).astype(np.float32),
                            "label": r.integers(0, 3, 64).astype(np.int32)})
    params = Net().init(jax.random.key(0), np.zeros((1, 4), np.float32))["params"]
    traces = []

    def apply_fn(variables, batch, *, train, rng=None):
        traces.append(1)  # runs once per compile
        return linen_apply(Net())(variables, batch, train=train, rng=rng)

    specs = [{"name": "probe", "steps": 3, "rules": (("classifier/**", 1.0), ("**", None)), "lr": 1e-2},
             {"name": "top", "steps": 3, "rules": (("backbone_encoder_layer_2/**", 1.0), ("classifier/**", 1.0),
                                                   ("**", None))},
             {"name": "all", "rules": (("**", 1.0),), "lr": 1e-3}]
    plan = phases.from_specs(specs, 9, default_lr=3e-3)

    def build():
        txs, steps = [], []
        for p in plan:
            tx, sched = optim.from_config({"name": "adamw", "lr": p.lr, "weight_decay": 0.01, "warmup_steps": 1},
                                          p.rules, total_steps=p.steps, start_step=p.start, strict=False)
            txs.append(tx)
            steps.append(make_train_step(apply_fn, losses.softmax_cross_entropy(), tx,
                                         masks.trainable_mask(params, p.rules, strict=False), lr_schedule=sched))
        return phases.PhasedStep(plan, txs, steps)

    return src, params, plan, build, traces


def test_phases_rules_carry_over_and_one_compile_each():
    src, params, plan, build, traces = _setup()
    assert [(p.name, p.start, p.end, p.lr) for p in plan] == [("probe", 0, 3, 1e-2), ("top", 3, 6, 3e-3),
                                                              ("all", 6, 9, 1e-3)]
    step = build()
    state = TrainState.create(params, step.txs[0])
    it = data.pipeline(src, global_batch_size=8, train=True)
    snapshots, lrs = [], []
    for i in range(9):
        if i == 3:  # entering phase 1 carries the optimizer state over by path
            old = tree.flatten(jax.device_get(state.opt_state))
            state = step.enter(state, 1)
            new = tree.flatten(jax.device_get(state.opt_state))
            head = [p for p in new if p.endswith("mu/classifier/kernel")]
            top = [p for p in new if p.endswith("mu/backbone_encoder_layer_2/kernel")]
            counts = [p for p in new if p.endswith("count")]
            assert len(head) == len(top) == 1 and counts and top[0] not in old
            np.testing.assert_array_equal(new[head[0]], old[head[0]])
            assert np.any(old[head[0]] != 0) and np.all(new[top[0]] == 0)  # kept; started from zeros
            assert all(int(new[c]) == 3 for c in counts)  # the run's step count goes on
        state, metrics = step(state, next(it))
        snapshots.append(tree.flatten(jax.device_get(state.params)))
        lrs.append(float(metrics["lr"]))
        assert float(metrics["phase"]) == phases.phase_at(plan, i)
    assert len(traces) == 3  # one compile per phase
    before = tree.flatten(params)
    changed = lambda i, p: not np.array_equal(snapshots[i][p], before[p])  # noqa: E731
    assert not changed(2, "backbone_encoder_layer_2/kernel") and changed(2, "classifier/kernel")
    assert changed(5, "backbone_encoder_layer_2/kernel") and not changed(5, "backbone_encoder_layer_0/kernel")
    assert changed(8, "backbone_encoder_layer_0/kernel")
    assert lrs[0] == 0.0 and lrs[3] == 0.0 and lrs[6] == 0.0  # each phase warms up from its start
    assert lrs[1] == pytest.approx(1e-2) and lrs[4] == pytest.approx(3e-3) and lrs[7] == pytest.approx(1e-3)


def test_resume_mid_phase_matches_an_uninterrupted_run(tmp_path):
    src, params, plan, build, _ = _setup()

    def run(workdir, steps, state=None):
        step = build()
        ckpt = Checkpointer(workdir, keep=5)
        latest = ckpt.latest_step()
        start = TrainState.create(params, step.txs[0], rng=1)
        if latest is not None:
            start = step.template(start, latest)
        out, _ = fit(start, step, data.pipeline(src, global_batch_size=8, train=True), steps=steps,
                     checkpointer=ckpt, checkpoint_every=1, progress=False)
        ckpt.close()
        return out

    whole = run(tmp_path / "whole", 9)
    run(tmp_path / "split", 4)  # stops inside phase 1
    assert phases.phase_of_checkpoint(plan, 4) == 1 and phases.phase_of_checkpoint(plan, 3) == 0
    resumed = run(tmp_path / "split", 9)
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


def test_unfreezing_phases_and_spec_errors():
    params = {"bert": {"embeddings": {"w": np.zeros(2)},
                       "encoder": {"layer": {str(i): {"w": np.zeros(2)} for i in range(3)}}},
              "classifier": {"kernel": np.zeros(2)}}
    plan = phases.unfreezing((("**", 1.0),), every=10, total_steps=45, num_layers=3,
                             layer_pattern=r"encoder/layer/(\d+)/", backbone="bert", lr=1e-3)
    assert [(p.name, p.start, p.end) for p in plan] == [("head", 0, 10), ("top1", 10, 20), ("top2", 20, 30),
                                                        ("top3", 30, 40), ("all", 40, 45)]
    trained = [sorted(p for p, t in tree.flatten(masks.trainable_mask(params, ph.rules, strict=False)).items() if t)
               for ph in plan]
    assert trained[0] == ["classifier/kernel"]
    assert trained[1] == ["bert/encoder/layer/2/w", "classifier/kernel"]
    assert "bert/embeddings/w" not in trained[3] and "bert/embeddings/w" in trained[4]
    short = phases.unfreezing((("**", 1.0),), every=10, total_steps=25, num_layers=3,
                              layer_pattern=r"encoder/layer/(\d+)/", backbone="bert", lr=1e-3)
    assert [p.name for p in short] == ["head", "top1", "all"] and short[-1].end == 25
    with pytest.raises(ValueError, match="give its length as steps or fraction"):
        phases.from_specs([{"rules": ()}, {"rules": ()}], 10, default_lr=1.0)
    with pytest.raises(ValueError, match=r"would cover steps \[0, 20\) of a 10-step run"):
        phases.from_specs([{"rules": (), "steps": 20}, {"rules": ()}], 10, default_lr=1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        phases.from_specs([{"rules": (), "epochs": 2}], 10, default_lr=1.0)

"""fit / evaluate / predict on a tiny MLP task, and kill-and-resume in a subprocess."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxfer import tree
from jaxfer.data.iterators import EvalBatches
from jaxfer.data.sources import from_arrays
from jaxfer.train.checkpoint import Checkpointer
from jaxfer.train.loop import evaluate, fit, predict

import _resume_script as task  # tests/ is on sys.path under pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "_resume_script.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_fit_learns_and_writes_logs(tmp_path):
    state, train_step, eval_step, train_iter, eval_batches = task.make_task()
    seen = []
    state, history = fit(state, train_step, train_iter, steps=36, eval_step=eval_step,
                         eval_batches=eval_batches, eval_every=12, label_names=task.LABEL_NAMES,
                         workdir=tmp_path, checkpoint_every=12, log_every=6, progress=False,
                         config={"lr": 0.03}, hooks=[lambda step, s, records: seen.append(step)])
    assert int(state.step) == 36 and seen == list(range(1, 37))
    train = [r for r in history if r["split"] == "train"]
    evals = [r for r in history if r["split"] == "eval"]
    assert [r["step"] for r in train] == [6, 12, 18, 24, 30, 36]
    assert [r["step"] for r in evals] == [12, 24, 36]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert train[0]["examples"] == 6 * task.BATCH and train[0]["examples_per_sec"] > 0
    assert evals[-1]["accuracy"] > 0.8 and evals[-1]["num_examples"] == 37
    assert set(evals[-1]["per_class"]) == set(task.LABEL_NAMES)
    assert read_jsonl(tmp_path / "metrics.jsonl") == history
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "config.json")) == {"lr": 0.03}
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 36 and ckpt.metrics(36)["accuracy"] == evals[-1]["accuracy"]
    # fitting again with the same workdir resumes at 36: nothing left to do
    again, history2 = fit(task.make_task()[0], train_step, train_iter, steps=36,
                          workdir=tmp_path, checkpoint_every=12, progress=False)
    np.testing.assert_array_equal(again.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
    assert history2 == history


def test_early_stopping(tmp_path):
    state, train_step, eval_step, train_iter, eval_batches = task.make_task(lr=0.0)
    state, history = fit(state, train_step, train_iter, steps=100, eval_step=eval_step,
                         eval_batches=eval_batches, eval_every=4, patience=2,
                         best_metric="loss", best_mode="min", log_every=4, progress=False)
    # lr 0: the first eval is the best, the next two do not improve -> stop at step 12
    assert int(state.step) == 12
    assert history[-1] == {"step": 12, "split": "stop", "reason": "early_stopping",
                           "best_step": 4, "loss": history[1]["loss"]}


def test_evaluate_counts_every_example_once():
    state, _, eval_step, _, _ = task.make_task()
    data = task.make_data(37, 2)
    source = from_arrays(data)
    for batches in (EvalBatches(source, 8), EvalBatches(source, 8, num_batches=7)):
        outputs = predict(state, eval_step, batches)
        assert set(outputs) == {"loss", "weight", "logits", "label"}
        np.testing.assert_array_equal(outputs["label"], data["label"])
        report = evaluate(state, eval_step, batches, task="classification")
        assert report["num_examples"] == 37
        assert sum(row["support"] for row in report["per_class"].values()) == 37
        assert report["loss"] == pytest.approx(float(outputs["loss"].mean()), rel=1e-6)
        preds = outputs["logits"].argmax(-1)
        assert report["accuracy"] == pytest.approx(float((preds == data["label"]).mean()))


def run_script(workdir, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, str(workdir), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    workdir = tmp_path / "run"
    killed = run_script(workdir, "--steps", "30", "--every", "10", "--kill-at", "10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
    assert not (workdir / "final_params.npz").exists()

    resumed = run_script(workdir, "--steps", "30", "--every", "10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "30"]  # keep=2
    final = dict(np.load(workdir / "final_params.npz"))

    snapshots = {}

    def snapshot(step, state, records):
        if step % 10 == 0:
            snapshots[step] = jax.device_get(state.params)

    state, history = task.train(None, steps=30, every=10, hooks=[snapshot])
    expected = tree.flatten(jax.device_get(state.params))
    assert final.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(final[path], expected[path], err_msg=path)
    # step 20 was written asynchronously while training went on with donated buffers
    restored, data_state, metrics = Checkpointer(workdir).restore(task.make_task()[0], step=20)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), snapshots[20])
    assert data_state["iterator"] == {"epoch": 1, "index": 8, "seed": 0}  # 12 batches/epoch
    assert metrics["num_examples"] == 37
    # the log reads like one run: records of the killed run after step 10 were dropped
    logged = read_jsonl(workdir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in logged] == [(r["step"], r["split"]) for r in history]


MULTIHOST_EVAL = """
import os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxfer.data.iterators import EvalBatches
from jaxfer.data.sources import from_arrays
from jaxfer.train.loop import evaluate, predict
import _resume_script as task

mesh = Mesh(np.array(jax.devices()), ("data",))
data = task.make_data(37, 2)
local = {k: v[pid::2] for k, v in data.items()}  # 19 and 18 examples
batches = EvalBatches(from_arrays(local), 4, num_batches=5)  # global batch 8, same count
w = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.eye(8, 3, dtype=np.float32))

def shard(batch):
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), v)
            for k, v in batch.items()}

@jax.jit
def eval_step(w, batch):
    logits = batch["x"] @ w
    loss = -jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["label"]]
    return {"loss": loss, "logits": logits, "label": batch["label"], "mask": batch["mask"]}

report = evaluate(w, eval_step, batches, task="classification", shard_batch=shard)
labels = predict(w, eval_step, batches, shard_batch=shard)["label"]
assert report["num_examples"] == 37, report["num_examples"]
assert sorted(labels.tolist()) == sorted(data["label"].tolist())
support = [row["support"] for row in report["per_class"].values()]
assert support == np.bincount(data["label"], minlength=3).tolist(), support
preds = (data["x"] @ np.eye(8, 3)).argmax(-1)
assert abs(report["accuracy"] - float((preds == data["label"]).mean())) < 1e-9
print("ok", pid)
"""


def test_evaluate_across_two_processes_counts_each_example_once(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.dirname(__file__)}
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_EVAL, str(pid), port], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for pid, (proc, (out, err)) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == f"ok {pid}", err[-3000:]

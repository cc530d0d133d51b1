"""Two processes on 127.0.0.1 through jax.distributed give the one-process result.

The MiniLM recipe (on stand-ins) runs 6 steps in one process with 4 CPU
devices; then as two processes with 2 devices each, first stopping at step 3
(a checkpoint), then resuming to step 6 with fresh processes. The final
parameters must match the single-process run.
"""

import os
import socket
import subprocess
import sys

import numpy as np

from tests import stand_ins

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
RECIPE = os.path.join(os.path.dirname(HERE), "configs", "minilm_tweets.py:top2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(bert, csv, workdir, steps):
    return ["--config", RECIPE, f"--config.model.source={bert}", f"--config.data.path={csv}",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
            "--config.data.max_eval_examples=0", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
            f"--config.train.steps={steps}", "--config.train.eval_every=3",
            "--config.train.checkpoint_every=3", "--config.train.log_every=1",
            "--workdir", str(workdir), "--no_progress"]


def _run(cmds, timeout=400):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in cmds]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    return outs


def _distributed(out, bert, csv, workdir, steps):
    port = _free_port()
    return _run([[sys.executable, WORKER, str(out), "2", *_args(bert, csv, workdir, steps),
                  "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]
                 for i in range(2)])


def test_two_processes_match_one_and_resume(tmp_path):
    bert = stand_ins.tiny_bert(str(tmp_path / "bert"))
    csv = stand_ins.tweets_csv(str(tmp_path / "tweets.csv"))
    _run([[sys.executable, WORKER, str(tmp_path / "one.npz"), "4",
           *_args(bert, csv, tmp_path / "one", 6)]])
    first = _distributed(tmp_path / "two_a.npz", bert, csv, tmp_path / "two", 3)
    second = _distributed(tmp_path / "two.npz", bert, csv, tmp_path / "two", 6)
    assert "resum" in second[0].lower() and "resum" not in first[0].lower()

    one, two, part = (np.load(tmp_path / f) for f in ("one.npz", "two.npz", "two_a.npz"))
    assert int(two["__processes__"]) == 2 and int(one["__processes__"]) == 1
    assert int(two["__devices__"]) == int(one["__devices__"]) == 4
    keys = [k for k in one.files if not k.startswith("__")]
    assert keys and set(keys) == {k for k in two.files if not k.startswith("__")}
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], atol=2e-5, err_msg=k)
    changed = [k for k in keys if not np.array_equal(part[k], two[k])]
    assert changed and all("layer/4" in k or "layer/5" in k or "classifier" in k for k in changed)

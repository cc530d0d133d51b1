"""Preemption: SIGTERM / SIGINT finish the step, save it, say where and exit 128 + signum;
resuming gives the parameters of an uninterrupted run, bit for bit. Several hosts stop on
JAX's preemption sync point instead of their own signals."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxfer import cli, tree
from jaxfer.errors import Preempted
from jaxfer.train import preemption
from jaxfer.train.checkpoint import Checkpointer

import _resume_script as task  # tests/ is on sys.path under pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "_resume_script.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(workdir, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, str(workdir), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def uninterrupted(steps=20, every=10):
    state, _ = task.train(None, steps=steps, every=every)
    return tree.flatten(jax.device_get(state.params))


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_saves_the_current_step_then_resume_is_bit_identical(tmp_path, sig):
    workdir = tmp_path / "run"
    stopped = run_script(workdir, "--steps", "20", "--every", "10", "--signal-at", f"7:{sig}")
    signum = getattr(signal, "SIG" + sig)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert f"checkpoint of step 7 saved in {workdir / 'checkpoints'}" in stopped.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["7"]  # off the every-10 schedule
    resumed = run_script(workdir, "--steps", "20", "--every", "10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = dict(np.load(workdir / "final_params.npz"))
    expected = uninterrupted()
    assert final.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(final[path], expected[path], err_msg=path)


def test_hosts_stop_together_on_the_preemption_sync_point(tmp_path, monkeypatch):
    """With several processes the loop asks JAX's sync point every step (no signal handlers)."""
    asked = []

    def sync_point(step):
        asked.append(step)
        return step == 5

    monkeypatch.setattr(preemption, "_sync_point", sync_point)
    monkeypatch.setattr(preemption, "_multihost", lambda: True)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as err:
        task.train(str(tmp_path), steps=20, every=10)
    assert asked == [1, 2, 3, 4, 5] and err.value.step == 5 and err.value.signum is None
    assert signal.getsignal(signal.SIGTERM) is before  # JAX's service keeps SIGTERM
    assert Checkpointer(tmp_path).all_steps() == [5]


def test_cli_exits_128_plus_signum_after_a_preemption(monkeypatch, capsys, tmp_path):
    from jaxfer import experiment

    def preempted(cfg, workdir, progress=True):
        raise Preempted(12, f"{workdir}/checkpoints", signal.SIGTERM)

    monkeypatch.setattr(experiment, "train", preempted)
    recipe = os.path.join(REPO, "configs", "minilm_tweets.py")
    assert cli.main(["train", "--config", recipe, "--workdir", str(tmp_path)]) == 143
    assert "checkpoint of step 12 saved" in capsys.readouterr().err

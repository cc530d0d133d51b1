"""Fault injection: a run SIGKILLed at 10 random points (before a step, half-way through a
log line, during an evaluation, with a checkpoint item written but not committed, just
before the commit, after a step), each time started again with the same command, ends with
the parameters of an uninterrupted run, bit for bit, and a log that reads like one run."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from jaxfer import tree

import _resume_script as task  # tests/ is on sys.path under pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "_resume_script.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KILLS = 30, 5, 10


def run_script(workdir, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, str(workdir), "--steps", str(STEPS),
                           "--every", str(EVERY), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def kill_points(seed=14):
    """10 distinct (step, phase) in run order: each phase at least once, the rest at random."""
    rng = np.random.default_rng(seed)
    candidates = [(s, p) for s in range(1, STEPS) for p in task.PHASES
                  if p in ("before_step", "after_step") or s % EVERY == 0]
    chosen = []
    for phase in task.PHASES:
        of_phase = [c for c in candidates if c[1] == phase and c not in chosen]
        chosen.append(of_phase[rng.integers(len(of_phase))])
    rest = [c for c in candidates if c not in chosen]
    chosen += [rest[i] for i in rng.choice(len(rest), KILLS - len(chosen), replace=False)]
    return sorted(chosen, key=lambda c: (c[0], task.PHASES.index(c[1])))


def test_sigkill_at_ten_random_points_then_resume_is_bit_identical(tmp_path):
    workdir = tmp_path / "run"
    points = kill_points()
    assert len(points) == KILLS and {p for _, p in points} == set(task.PHASES)
    for step, phase in points:
        killed = run_script(workdir, "--fault", f"{step}:{phase}")
        assert killed.returncode == -signal.SIGKILL, (step, phase, killed.stderr[-3000:])
        assert not (workdir / "final_params.npz").exists()
    finished = run_script(workdir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "stale lock" in finished.stderr  # the killed run's lock, taken over

    state, history = task.train(None, steps=STEPS, every=EVERY)
    expected = tree.flatten(jax.device_get(state.params))
    final = dict(np.load(workdir / "final_params.npz"))
    assert final.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(final[path], expected[path], err_msg=path)
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [(r["step"], r["split"]) for r in logged] == [(r["step"], r["split"]) for r in history]

"""Interleaved timing, peak memory in a child process, and Markdown tables.

Every benchmark here compares runners (a jax step, a torch step, a matmul)
that are timed *interleaved*: round ``r`` calls every runner once, in turn, so
other work on the machine slows them all alike and the ratios hold even when
the absolute times move. Reported per runner:

* ``seconds``: the median wall time of one call;
* ``cpu_seconds``: the median process CPU time (user + system, all threads)
  of one call. On a shared CPU this is the steadier number (it does not count
  the time other processes held the cores) and ``cpu_seconds / threads`` is the
  wall time the call would take with the cores to itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass
class Runner:
    """One thing to time: ``run()`` does one step (and waits for it)."""

    name: str
    run: Callable[[], Any]
    seconds: float = float("nan")
    cpu_seconds: float = float("nan")
    info: dict = dataclasses.field(default_factory=dict)


def interleave(runners: Sequence[Runner], *, warmup: int, steps: int) -> None:
    """Time ``steps`` calls of every runner after ``warmup`` calls, round-robin;
    fills ``seconds`` and ``cpu_seconds`` (medians)."""
    for _ in range(warmup):
        for r in runners:
            r.run()
    wall: list[list[float]] = [[] for _ in runners]
    cpu: list[list[float]] = [[] for _ in runners]
    for _ in range(steps):
        for r, w, c in zip(runners, wall, cpu):
            c0, w0 = time.process_time(), time.perf_counter()
            r.run()
            w.append(time.perf_counter() - w0)
            c.append(time.process_time() - c0)
    for r, w, c in zip(runners, wall, cpu):
        r.seconds, r.cpu_seconds = statistics.median(w), statistics.median(c)


def compiled_step(step: Callable, state: Any, batch: Any) -> tuple[Callable[[], None], dict]:
    """Compile a jitted ``step(state, batch) -> (state, metrics)`` ahead of time: a
    ``run()`` doing one step (the state carried from call to call, waited for) and
    ``{"compile_s", "flops"}`` (XLA's cost analysis; NaN where it has none)."""
    import jax

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    return run, {"compile_s": compile_s, "flops": float(cost.get("flops", float("nan")))}


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MB).

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this
    process's own memory. Not ``getrusage``'s ``ru_maxrss``, which Linux carries
    across ``fork`` + ``exec`` (the kernel keeps the larger of the parent's RSS at
    the fork and the child's), so a child started by a 4 GB benchmark process
    reports at least 4 GB whatever it does -- why both frameworks' columns once
    came out equal.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def child_peak_rss(script: str, args: Sequence[str], timeout: float = 1800) -> float | None:
    """Run ``python script *args`` (which prints one JSON line with ``peak_rss_mb``
    last) and return that number; ``None`` (with the error on stderr) if it failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAXFER_BENCH_CHILD": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"# peak RSS child {' '.join(args)} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return float(json.loads(lines[-1])["peak_rss_mb"])


def run_logged(cmd: Sequence[str], workdir: str, cwd: str | None = None) -> tuple[subprocess.CompletedProcess, float,
                                                                                   str | None]:
    """Run ``cmd`` (a ``jaxfer train ...`` in a fresh process), timed from the outside;
    its stdout and stderr go to ``workdir/stdout.log``. Returns ``(proc, seconds,
    error)``: ``error`` is the last three lines of its output joined by `` | `` when it
    failed, else ``None``."""
    t0 = time.time()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd)
    seconds = time.time() - t0
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stdout.log"), "w") as f:
        f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    error = None
    if proc.returncode != 0:
        error = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return proc, seconds, error


def fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)

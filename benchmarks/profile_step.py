"""Where a jaxfer training step's time goes: one family and mode of ``steps.py``, traced
with ``jax.profiler`` and summed by XLA operation kind.

    python benchmarks/profile_step.py --family bert --mode full
    python benchmarks/profile_step.py --family efficientnet --mode full --steps 2

Prints the step's wall time, its XLA GFLOP, and a table of the compiled step's
operations grouped by kind (the fusion's name without its number: ``ynn_fusion``
is a matmul through YNNPACK, ``dot`` one through Eigen, ``broadcast_add_fusion``
often the dropout masks' random bits, ``copy_bitcast_fusion`` / ``transpose_copy_fusion``
layout changes before a matmul, ``wrapped_reduce-window`` XLA:CPU's split of a
large reduction such as a norm), each with its ms per step, count per step and share.
The op times are summed over XLA's worker threads, so they can exceed the wall time.
The trace stays in ``--out`` (TensorBoard / XProf can open it). Grouping the trace
needs ``xprof`` (``pip install xprof``); without it only the trace is written.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402
import steps  # noqa: E402

HOST_EVENTS = ("ThreadpoolListener", "ThunkExecutor", "$", "Pjit", "SlinkyThreadPool")


def op_table(trace_dir: str, num_steps: int, wall_ms: float, top: int = 20) -> str:
    """Markdown table of the traced XLA ops by kind (ms per step, count per step, share)."""
    from xprof.convert import raw_to_tool_data

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    paths = [max(paths, key=os.path.getmtime)]  # this run's (an earlier one may share the folder)
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    events = json.loads(data if isinstance(data, str) else data.decode())["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    total: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(HOST_EVENTS):
            continue
        if threads.get((e["pid"], e["tid"]), "").startswith("python"):
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        total[kind] += e["dur"] / 1e3 / num_steps
        count[kind] += 1
    summed = sum(total.values())
    lines = [f"op time summed over threads: {summed:.0f} ms per step (wall {wall_ms:.0f} ms)", "",
             "| op kind | ms / step | ops / step | share of op time |", "|---|---|---|---|"]
    for kind, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{kind}` | {ms:.1f} | {count[kind] / num_steps:.0f} | {ms / summed:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="bert", choices=sorted(families.FAMILIES))
    p.add_argument("--mode", default="full", choices=families.MODES)
    p.add_argument("--steps", type=int, default=3, help="steps traced (after 2 untraced)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seq", type=int, default=None, help="bert: tokens per example (default 64)")
    p.add_argument("--dropout-rng", default=steps.DEFAULT_DROPOUT_RNG, choices=steps.DROPOUT_RNGS)
    p.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="call jaxfer.reuse_host_memory() first, as the jaxfer command does")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=None, help="trace folder (default: /tmp/jaxfer-profile-<family>-<mode>)")
    args = p.parse_args(argv)
    if args.reuse_host_memory:
        from jaxfer.train.hostmem import reuse_host_memory

        reuse_host_memory()
    out = args.out or f"/tmp/jaxfer-profile-{args.family}-{args.mode}"
    case = families.FAMILIES[args.family](**({"seq": args.seq} if args.seq else {}))
    runner = steps.jax_step(case, args.mode, args.dtype, args.dropout_rng)
    runner.run()
    runner.run()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        runner.run()
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    with jax.profiler.trace(out):
        for _ in range(args.steps):
            runner.run()
    flops = runner.info.get("flops", float("nan"))
    print(f"{args.family} {args.mode}: {wall_ms:.0f} ms per step untraced, {flops / 1e9:.1f} GFLOP "
          f"({flops / wall_ms / 1e6:.0f} GFLOP/s); trace in {out}")
    try:
        print(op_table(out, args.steps, wall_ms, args.top))
    except ImportError:
        print("(pip install xprof to group the trace by operation kind)")
    if np.isnan(flops):
        print("(no XLA cost analysis on this backend)")


if __name__ == "__main__":
    main()

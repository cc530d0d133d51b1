"""Time to the first training step of the quickstart: import, load, tokenise, compile, step.

Runs ``experiment.setup`` of ``configs/minilm_tweets.py`` (default variant,
or ``--variant``) in a fresh process and times its phases, then the first train
step (its compile included) and the first evaluation batch (the eval step's
compile). Three runs, each a fresh process:

* ``cold`` -- a new workdir and an empty compilation cache;
* ``warm tokens`` -- the same workdir again: the tokens come from ``workdir/cache``;
* ``warm tokens + XLA`` -- and ``train.compilation_cache`` set to a directory the
  previous run filled: the steps come from jax's persistent compilation cache.

    python benchmarks/first_step.py            # ~2-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(workdir: str, variant: str, cache: str) -> dict:
    t0 = time.perf_counter()
    import jax

    from jaxfer import config as config_lib
    from jaxfer import experiment

    t_import = time.perf_counter()
    cfg = config_lib.load(os.path.join(ROOT, "configs", f"minilm_tweets.py:{variant}"))
    if cache:
        cfg.unlock()
        cfg.train.compilation_cache = cache
    phases = {}
    for name in ("build_model", "build_data"):  # time the phases setup goes through
        fn = getattr(experiment, name)

        def timed(*a, _fn=fn, _name=name, **k):
            s = time.perf_counter()
            out = _fn(*a, **k)
            phases[_name] = time.perf_counter() - s
            return out

        setattr(experiment, name, timed)
    run = experiment.setup(cfg, workdir)
    t_setup = time.perf_counter()
    batch = next(run.data.train)
    state, metrics = run.train_step(run.state, run.shard_batch(batch))
    jax.block_until_ready(metrics)
    t_step = time.perf_counter()
    jax.block_until_ready(run.eval_step(state, run.shard_batch(next(iter(run.data.validation)))))
    t_eval = time.perf_counter()
    return {"import": t_import - t0, "load": phases["build_model"], "tokenise": phases["build_data"],
            "other setup": t_setup - t_import - phases["build_model"] - phases["build_data"],
            "first train step (compile)": t_step - t_setup, "first eval batch (compile)": t_eval - t_step,
            "to first step": t_step - t0, "total": t_eval - t0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="top2")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import harness
    import machine

    print(machine.describe())
    print(f"# quickstart ({args.variant}): seconds from `python` to the first train step, each run a fresh process\n")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir, cache = os.path.join(tmp, "run"), os.path.join(tmp, "xla")
        for label, use_cache in (("cold", cache), ("warm tokens", ""), ("warm tokens + XLA", cache)):
            if label == "cold":  # fills the XLA cache for the third run
                pass
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", workdir, args.variant,
                                   use_cache], capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                print(f"# {label} failed:\n{proc.stderr[-3000:]}")
                return
            results[label] = json.loads(lines[-1])
    phases = list(next(iter(results.values())))
    print(harness.table(["phase", *results], [[ph, *(f"{r[ph]:.1f}" for r in results.values())] for ph in phases]))


if __name__ == "__main__":
    main()

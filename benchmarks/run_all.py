"""Every benchmark table, one command: steps (every family and mode), one epoch, first step.

    python benchmarks/run_all.py                 # ~40-60 min on an idle 2-core CPU
    python benchmarks/run_all.py --quick         # small sizes, a few steps: a smoke run

Each benchmark runs in its own process, one after the other, and prints its
Markdown table(s) as it finishes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_STEPS = ["--steps", "2", "--warmup", "1", "--no-rss", "--matmul-n", "512",
               "--bert-layers", "3", "--bert-seq", "32", "--bert-batch-size", "8",
               "--vit-layers", "3", "--vit-image", "64", "--vit-batch-size", "4",
               "--resnet-depths", "1,1,1,1", "--resnet-image", "64", "--resnet-batch-size", "4",
               "--efficientnet-image", "64", "--efficientnet-batch-size", "4"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated: steps,epoch,first_step")
    p.add_argument("--steps-args", default="", help='more steps.py arguments, e.g. "--dtype bfloat16 --no-rss"')
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    runs = [("steps", ["steps.py", *(QUICK_STEPS if args.quick else []), *args.steps_args.split()]),
            ("epoch", ["epoch.py", *(["--limit", "256", "--test-limit", "256"] if args.quick else [])]),
            ("first_step", ["first_step.py"])]
    for name, cmd in runs:
        if name in skip:
            continue
        print(f"\n## {name}\n", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], check=False)


if __name__ == "__main__":
    main()

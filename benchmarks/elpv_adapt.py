"""The README's domain-shift table: ELPV monocrystalline -> polycrystalline cells, every method, several seeds.

Each cell of the grid is ``jaxfer train --config configs/effnet_elpv.py:adapt
--config.adapt.method=<method> --config.seed=<seed>`` in its own process and
workdir: the real EfficientNet-Lite0, its last two stages and head trained on the
labelled monocrystalline cells (697 training images) while, for every method but
``none`` and ``adabn``, 32 unlabelled polycrystalline training images ride along
in each step; tested on the 386 polycrystalline test cells (the target) and on
the 268 monocrystalline ones (the source). The seed draws the 65/10/25 split
(stratified by grade; the sizes stay the same), the head's initialisation, the
batch order and the augmentation: a method and source only with the same seed
see the same cells, and the table pairs them.
A finished cell (its ``test_metrics.json``) is read back, not run again, so an
interrupted grid continues where it stopped (``--fresh`` reruns everything).

    python benchmarks/elpv_adapt.py --out runs/elpv_adapt                         # 8 methods x 5 seeds
    python benchmarks/elpv_adapt.py --out runs/elpv_adapt --seeds 0 1 --methods none dann coral
    python benchmarks/elpv_adapt.py --out /tmp/a --seeds 0 --methods none dann \
        -- --config.train.steps=6 --config.data.image_size=64                   # a quick check

Prints a Markdown table (mean +- standard deviation over seeds of the target
test accuracy and macro-F1; the mean difference in target macro-F1 from the
source-only run of the same seed, and in how many seeds it is positive; the
source test macro-F1; wall time per run) and
writes it (``table.md``) and every run's numbers (``results.json``) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
CONFIG = os.path.join(ROOT, "configs", "effnet_elpv.py") + ":adapt"
METHODS = ("none", "adabn", "dann", "cdan", "cdan+e", "coral", "mmd", "mcc")
WHAT = {"none": "source only", "adabn": "AdaBN (target batch-norm statistics)", "dann": "DANN",
        "cdan": "CDAN", "cdan+e": "CDAN+E", "coral": "CORAL", "mmd": "multi-kernel MMD",
        "mcc": "MCC (minimum class confusion)"}


def run_one(method: str, seed: int, out: str, extra: list[str], fresh: bool) -> dict:
    workdir = os.path.join(out, f"{method}_seed{seed}")
    metrics_file = os.path.join(workdir, "test_metrics.json")
    record = os.path.join(workdir, "run.json")
    if not fresh and os.path.exists(metrics_file) and os.path.exists(record):
        return json.load(open(record))
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxfer.cli", "train", "--config", CONFIG, "--workdir", workdir, "--no_progress",
           f"--config.adapt.method={method}", f"--config.seed={seed}", *extra]
    _, seconds, error = harness.run_logged(cmd, workdir, cwd=ROOT)
    if error:
        return {"method": method, "seed": seed, "error": error}
    r = json.load(open(metrics_file))
    row = {"method": method, "seed": seed, "target_accuracy": r["test"]["accuracy"],
           "target_macro_f1": r["test"]["macro_f1"], "source_accuracy": r["source_test"]["accuracy"],
           "source_macro_f1": r["source_test"]["macro_f1"], "pixel_baseline": r.get("baseline"),
           "majority_baseline": r.get("majority_baseline"), "wall_seconds": seconds,
           "command": "jaxfer train --config configs/effnet_elpv.py:adapt " + " ".join(cmd[8:])}
    with open(record, "w") as f:
        json.dump(row, f, indent=1)
    return row


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict]) -> str:
    lines = ["| method | seeds | target accuracy | target macro-F1 | paired with source only | source macro-F1 "
             "| wall time per run |", "|---|---|---|---|---|---|---|"]
    alone = {r["seed"]: r["target_macro_f1"] for r in rows if r["method"] == "none" and "error" not in r}
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == method and "error" not in r]
        failed = [r for r in rows if r["method"] == method and "error" in r]
        if not done:
            lines.append(f"| {WHAT.get(method, method)} (`{method}`) | 0 | failed: {failed[0]['error']} | | | | |")
            continue
        pairs = [r["target_macro_f1"] - alone[r["seed"]] for r in done if r["seed"] in alone]
        paired = (f"{statistics.mean(pairs):+.4f}, better in {sum(d > 0 for d in pairs)} of {len(pairs)}"
                  if pairs and method != "none" else "—")
        lines.append(f"| {WHAT.get(method, method)} (`{method}`) | {len(done)} | "
                     f"{_mean_std([r['target_accuracy'] for r in done])} | "
                     f"{_mean_std([r['target_macro_f1'] for r in done])} | {paired} | "
                     f"{_mean_std([r['source_macro_f1'] for r in done])} | "
                     f"{statistics.mean(r['wall_seconds'] for r in done):.0f} s |")
    bases = [r for r in rows if r["method"] == "none" and r.get("pixel_baseline")]  # one per seed (its split)
    if bases:
        name = bases[0]["pixel_baseline"]["name"]
        for label, key in ((f"no transfer: {name}, fitted on the source", "pixel_baseline"),
                           ("majority class of the source", "majority_baseline")):
            lines.append(f"| {label} | {len(bases)} | {_mean_std([r[key]['accuracy'] for r in bases])} | "
                         f"{_mean_std([r[key]['macro_f1'] for r in bases])} | — | — | — |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="workdirs, table.md and results.json go here")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--fresh", action="store_true", help="rerun finished cells too")
    p.add_argument("extra", nargs="*", help="after --: overrides for every run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for seed in args.seeds:  # seed by seed: an early stop still has every method once
        for method in args.methods:
            rows.append(run_one(method, seed, args.out, args.extra, args.fresh))
            r = rows[-1]
            print(f"{method} seed {seed}: " + (f"failed: {r['error']}" if "error" in r else
                  f"target acc {r['target_accuracy']:.4f} macro-F1 {r['target_macro_f1']:.4f}, source macro-F1 "
                  f"{r['source_macro_f1']:.4f}, {r['wall_seconds']:.0f} s"), flush=True)
    rows.sort(key=lambda r: (args.methods.index(r["method"]), r["seed"]))
    stamp = f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores"
    text = table(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"{stamp}\n\n{text}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": stamp, "rows": rows}, f, indent=1)
    print(f"\n{stamp}\n{text}")


if __name__ == "__main__":
    main()

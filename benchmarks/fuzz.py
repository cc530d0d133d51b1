"""Fuzz the readers and config overrides with many more inputs than the test suite does.

Runs the property tests of ``tests/test_fuzz.py`` (weight readers: safetensors,
``.bin``, ``.npz``, msgpack, shard indexes; CSV and JSONL readers; config
overrides) with ``--examples`` inputs per target and prints, per target, the
inputs tried, the crashes (an exception other than jaxfer's own error types, or
a shard index reaching outside its folder) and the hangs (no answer within 20 s).

    python benchmarks/fuzz.py --examples 1500      # about 16,500 inputs in all
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1500, help="inputs per target")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts_path, junit = os.path.join(tmp, "counts.json"), os.path.join(tmp, "junit.xml")
        env = {**os.environ, "JAXFER_FUZZ_EXAMPLES": str(args.examples),
               "JAXFER_FUZZ_REPORT": counts_path, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly",
                               os.path.join(ROOT, "tests", "test_fuzz.py"), f"--junitxml={junit}"],
                              cwd=ROOT, env=env)
        counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {}
        failures = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failures.append((case.get("name"), bad.get("message", "") + (bad.text or "")))
    hangs = sum("Hang" in text for _, text in failures)
    crashes = len(failures) - hangs
    print(f"\n| target | inputs |\n|---|---|")
    for target, n in sorted(counts.items()):
        print(f"| `{target}` | {n:,} |")
    print(f"| **total** | **{sum(counts.values()):,}** |")
    print(f"\ncrashes: {crashes}, hangs: {hangs} (targets failing: {[name for name, _ in failures]})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

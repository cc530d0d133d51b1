"""reuse_host_memory: a jitted step's buffers come from memory the previous step freed (page faults per step
fall from thousands to ~0), it is a no-op when turned off, and a repeated call is harmless."""

import json
import os
import subprocess
import sys

import pytest

from jaxfer.train import hostmem

SCRIPT = r"""
import json, resource, sys
from jaxfer.train import hostmem
applied = hostmem.reuse_host_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x, i: jnp.sin(x) * i)  # a fresh 64 MB output every call, the old one freed
x = jnp.ones((4096, 4096))
for i in range(6):  # the heap grows to its working size over the first calls
    f(x, i).block_until_ready()
faults = []
for i in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, i).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[len(faults) // 2]  # the median call
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc only")
def test_reused_memory_takes_no_page_faults_per_step():
    default, reused = _faults("default"), _faults("reuse")
    assert not default["applied"] and reused["applied"]
    assert default["faults"] > 5000, default  # 64 MB of fresh pages each call: ~16k faults of 4 KB
    assert reused["faults"] < default["faults"] / 20, (default, reused)
    off = _faults("reuse", **{hostmem.ENV: "0"})
    assert not off["applied"] and off["faults"] > 5000


def test_repeated_call_and_switch(monkeypatch):
    monkeypatch.setattr(hostmem, "_applied", False)
    monkeypatch.setenv(hostmem.ENV, "off")
    assert hostmem.reuse_host_memory() is False
    monkeypatch.setattr(hostmem, "_glibc", lambda: None)
    monkeypatch.setenv(hostmem.ENV, "1")
    assert hostmem.reuse_host_memory() is False  # not glibc: nothing done
    monkeypatch.setattr(hostmem, "_applied", True)
    assert hostmem.reuse_host_memory() is True  # already in force: no second mallopt

"""What a benchmark ran on, and how fast its matmuls go there.

Ratios between frameworks move with the machine (XLA:CPU's and oneDNN's matmul
kernels differ by 2x on some CPUs), so every table records:

* :func:`describe` -- CPU model, core count, the instruction sets that decide
  matmul speed (AVX2, AVX-512, AVX-512 BF16, AMX), the accelerator, and the
  jax / torch / transformers versions;
* the in-run matmul rate of each framework, measured by :func:`matmul_runners`
  *interleaved with the steps themselves*, so a busy machine slows both alike;
* on an accelerator, its peak dense rate (:func:`peak_flops`), for MFU.
"""

from __future__ import annotations

import datetime
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

# ISA flags (as /proc/cpuinfo spells them) that change matmul speed
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile")

# dense bf16 peak FLOP/s per chip (no sparsity), by a substring of device_kind / torch's device name
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}


def cpu_info() -> dict:
    """``{"model": ..., "isa": [...]}`` from /proc/cpuinfo (Linux), else ``platform``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def describe(threads: int | None = None) -> str:
    """One comment line: date, CPU, ISA, cores, accelerator, versions."""
    cpu = cpu_info()
    dev = jax.devices()[0]
    parts = [str(datetime.date.today()), f"{cpu['model']} ({platform.machine()})",
             f"{os.cpu_count()} cores", "ISA " + (",".join(cpu["isa"]) or "-"),
             f"jax {jax.__version__} on {dev.platform}" + ("" if dev.platform == "cpu" else f" ({dev.device_kind})")]
    try:
        import torch
        import transformers

        tdev = torch_device()
        parts.append(f"torch {torch.__version__} on {tdev}"
                     + (f" ({torch.cuda.get_device_name()})" if tdev == "cuda" else f", {torch.get_num_threads()} threads"))
        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("no torch")
    return "# " + ", ".join(parts)


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_flops(name: str) -> float | None:
    """The accelerator's dense bf16 peak (FLOP/s), ``None`` on a CPU or an unknown chip."""
    for key, value in PEAK_BF16.items():
        if key.lower() in name.lower():
            return value
    return None


def jax_peak() -> float | None:
    dev = jax.devices()[0]
    return None if dev.platform == "cpu" else peak_flops(dev.device_kind)


def torch_peak() -> float | None:
    import torch

    return peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def matmul_runners(n: int, dtype: str = "float32", torch_too: bool = True) -> dict:
    """``{"jax": run, "torch": run}``: one ``n x n @ n x n`` matmul each (``2 n^3`` FLOP).

    The runners go into the same interleaved timing loop as the steps, so the
    rates they give are the rates of *this* run, on *this* machine state.
    """
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype))
    f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    runners = {"jax": lambda: jax.block_until_ready(f(a, a))}
    if torch_too:
        import torch

        dev = torch_device()
        t = torch.from_numpy(np.asarray(a, np.float32)).to(dev, getattr(torch, dtype))

        def run_torch():
            torch.mm(t, t)
            if dev == "cuda":
                torch.cuda.synchronize()

        runners["torch"] = run_torch
    return runners

"""Keep freed host memory for reuse: no page faults on every CPU training step.

XLA:CPU allocates a step's temporary buffers and its outputs with ``malloc`` and
frees them when the step ends. glibc serves allocations above its mmap threshold
(and everything in the per-thread arenas of XLA's worker threads) from fresh
``mmap`` pages and gives them back to the kernel on ``free``, so the next step
touches brand-new pages again: the kernel zeroes and maps each one. For a
MiniLM-size BERT step (batch 32 x 64 tokens) that is ~143,000 page faults, ~560
MB, per step, and ~19% of the step's time (``benchmarks/README.md``).

:func:`reuse_host_memory` tells glibc (``mallopt``) to

* serve every thread from one arena (``M_ARENA_MAX = 1``),
* never use ``mmap`` for an allocation (``M_MMAP_MAX = 0``), and
* never give the top of the heap back (``M_TRIM_THRESHOLD`` = 2 GiB - 1),

so a step's buffers come from memory the previous step freed. Peak memory is
unchanged (the process keeps what it needed at its peak; measured 1.46 vs 1.53 GB
for the step above) and nothing else changes: the numbers computed are the same.

It must run **before the first jax computation** (XLA's worker threads get their
arena when they first allocate, and keep it). The ``jaxfer`` command calls it first
thing; in your own script, call it right after the imports. Where the C library
is not glibc (macOS, musl) it does nothing and returns ``False``; the environment
variable ``JAXFER_REUSE_HOST_MEMORY=0`` turns it off. The same from the shell,
for any process: ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["reuse_host_memory", "ENV"]

ENV = "JAXFER_REUSE_HOST_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int

_applied = False


def _glibc():
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else ``None``."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def reuse_host_memory() -> bool:
    """Make glibc keep freed memory for the next step (module docstring). ``True`` when
    the settings are in force (also on a repeated call), ``False`` when not glibc or
    turned off by ``JAXFER_REUSE_HOST_MEMORY=0``."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(libc.mallopt(option, value) == 1 for option, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    _applied = ok
    return ok

"""Asked to stop: SIGTERM / SIGINT on one host, the preemption sync point on many.

Schedulers, spot/preemptible VMs and TPU maintenance stop a job with SIGTERM
(SIGINT is Ctrl-C). :class:`StopRequests` turns them into a request the loop
reads after each step: it finishes that step, writes a checkpoint, says where,
and raises :class:`~jaxfer.errors.Preempted` (the CLI exits ``128 + signum``,
143 for SIGTERM). A second signal while saving acts at once (the handlers are
the previous ones again).

With several processes (``jax.distributed``), the hosts must agree on the step
they save, so no Python handler is installed: JAX's preemption
service (``jax_enable_preemption_service``, on by default) catches the notice
on any host and :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`,
asked every step by every process (as orbax's ``reached_preemption`` does),
turns true on the same step everywhere.
"""

from __future__ import annotations

import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _multihost() -> bool:
    return jax.process_count() > 1


def _sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the preemption service is switched off
        return False


class StopRequests:
    """``with StopRequests() as stop: ... if stop.requested(step): save and raise``."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self.multihost = _multihost()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()  # a second signal is not swallowed

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        # several processes must stop on the same step: a signal seen by one host
        # cannot decide that, JAX's preemption service (which owns SIGTERM) does
        if not self.multihost and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, step: int) -> bool:
        """Should the run save and stop after ``step``? (Every process must ask, every step.)"""
        return _sync_point(step) if self.multihost else self.signum is not None

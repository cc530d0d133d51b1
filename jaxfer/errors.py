"""The errors jaxfer raises for problems the user can fix, one type per kind of problem.

Every one is a :class:`JaxferError` whose message names what is wrong and where
(the file and line, the config key, the checkpoint directory, the step), so the
command line prints it as one line and exits 1 (``--debug`` keeps the
traceback); anything else that escapes is a bug in jaxfer. Each also derives
from the builtin a caller would expect (``ValueError`` for bad values,
``OSError`` for the disk), so ``except ValueError`` keeps working.

:class:`Preempted` is not an error of the user: the run was asked to stop
(SIGTERM, SIGINT, a preemption notice), saved a checkpoint and unwound.
"""

from __future__ import annotations


class JaxferError(Exception):
    """A problem with the user's input, files or run, explained by the message."""


class ConfigError(JaxferError, ValueError):
    """A configuration (or argument) value that cannot run, found before any compute."""


class DataError(JaxferError, ValueError):
    """Data that cannot be trained on as given: unreadable rows (file and line named),
    labels outside the head, token ids outside the vocabulary, empty sources."""


class WeightsError(JaxferError, ValueError):
    """A pretrained weights file is missing, corrupt, truncated, of an unknown format,
    or names files outside its folder."""


class CheckpointError(JaxferError, RuntimeError):
    """A training checkpoint is missing, partial or corrupt, or does not fit the template."""


class UnreadableCheckpointError(CheckpointError):
    """A training checkpoint on disk is partial or corrupt (``step`` names it)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class WorkdirError(JaxferError, OSError):
    """The run directory cannot be used: held by another run, read-only, or full."""


class NonFiniteError(JaxferError, FloatingPointError):
    """Training produced non-finite values (loss, gradients, parameters or model state)."""


class Preempted(Exception):
    """The run stopped on a signal or preemption notice after saving a checkpoint.

    ``step``: the step saved; ``directory``: where (``None`` without a
    checkpointer); ``signum``: the signal (``None`` for a multi-host preemption
    notice). The command line exits with ``128 + signum`` (143 for SIGTERM).
    """

    def __init__(self, step: int, directory: str | None, signum: int | None):
        self.step, self.directory, self.signum = step, directory, signum
        where = f"checkpoint of step {step} saved in {directory}" if directory else \
            f"stopped at step {step} (no checkpointer: nothing saved)"
        super().__init__(f"preempted ({_signal_name(signum)}): {where}; run the same command "
                         "again to resume")


def _signal_name(signum: int | None) -> str:
    if signum is None:
        return "preemption notice"
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

"""The run directory: one path layer for every file jaxfer writes or reads in a workdir.

A workdir is a local folder or any location ``etils.epath`` speaks (``gs://``,
``s3://``, ... and any scheme registered with ``epath.register_path_cls``), the
same paths orbax writes checkpoints to. Everything else in a workdir
(``config.json``, ``metrics.jsonl``, ``test_metrics.json``, TensorBoard events,
``curves.png``, the lock) goes through the functions here, so on a pod the logs
land in the bucket beside the checkpoints instead of in a local folder named
``gs:``.

Contracts:

* :func:`write_bytes` / :func:`write_text` / :func:`write_json` replace a file
  whole: locally through a temporary file and ``os.replace`` (a crash leaves the
  old file or the new one, never half of one); elsewhere as one object write.
* :class:`JsonLines` appends records (locally in append mode; on object stores,
  which cannot append, by rewriting the file).
* A full disk, a read-only mount or a permission error become one
  :class:`~jaxfer.errors.WorkdirError` naming the path (:func:`disk_errors`).
* :class:`Lock`: one run per workdir. ``workdir/jaxfer.lock`` holds the owner's
  host, pid and a heartbeat. A lock whose process is gone (same host: the pid
  is not running, or is another process) or whose heartbeat is older than
  ``stale_after`` seconds (another host) is stale and taken over with a
  warning; otherwise opening the workdir is an error naming the owner.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from etils import epath

from jaxfer.errors import WorkdirError

logger = logging.getLogger(__name__)

LOCK_FILE = "jaxfer.lock"
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore reports them


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path`` (local, ``gs://``, or any registered scheme)."""
    return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
    return "://" not in os.fspath(p)


# ------------------------------------------------------------------ errors
def disk_problem(error: BaseException) -> str | None:
    """What is wrong with the disk, if ``error`` (or what caused it) says so."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None)
        if code is None:
            match = _OS_ERROR_CODE.search(str(error))
            code = int(match.group(1)) if match else None
        if code in _DISK_ERRNOS:
            return f"{_DISK_ERRNOS[code]} ({errno.errorcode.get(code, code)})"
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def disk_errors(target: str | os.PathLike, keep_note: str = "") -> Iterator[None]:
    """Turn a full disk / read-only mount / permission error while writing ``target``
    into one :class:`WorkdirError` naming it (``keep_note`` says what is intact)."""
    try:
        yield
    except WorkdirError:
        raise
    except Exception as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        note = f"; {keep_note}" if keep_note else ""
        raise WorkdirError(f"cannot write {os.fspath(target)}: {problem}{note}") from e


# ------------------------------------------------------------- whole files
def makedirs(p: str | os.PathLike) -> epath.Path:
    p = path(p)
    with disk_errors(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def write_bytes(p: str | os.PathLike, data: bytes) -> epath.Path:
    """Replace the file ``p`` with ``data`` (atomically on a local disk)."""
    p = path(p)
    with disk_errors(p):
        if not is_local(p):
            p.parent.mkdir(parents=True, exist_ok=True)
            with p.open("wb") as f:
                f.write(data)
            return p
        os.makedirs(os.path.dirname(os.path.abspath(p)) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=os.path.dirname(os.path.abspath(p)))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    return p


def write_text(p: str | os.PathLike, text: str) -> epath.Path:
    return write_bytes(p, text.encode("utf-8"))


def write_json(p: str | os.PathLike, obj: Any, indent: int | None = 1) -> epath.Path:
    return write_text(p, json.dumps(obj, indent=indent) + "\n")


def read_text(p: str | os.PathLike) -> str:
    with path(p).open("r") as f:
        return f.read()


def read_json(p: str | os.PathLike) -> Any:
    return json.loads(read_text(p))


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def remove(p: str | os.PathLike) -> None:
    p = path(p)
    with disk_errors(p):
        if p.exists():
            p.unlink()


# --------------------------------------------------------------- appending
class JsonLines:
    """``metrics.jsonl``: one JSON record per line, appended as the run goes."""

    def __init__(self, p: str | os.PathLike, records: list[dict] | None = None):
        """Start the file with ``records`` (replacing what was there)."""
        self.path = path(p)
        self._records = list(records or [])
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._records))
        self._file = None
        if is_local(self.path):
            with disk_errors(self.path):
                self._file = open(self.path, "a")

    @staticmethod
    def read(p: str | os.PathLike) -> list[dict]:
        """The records of a file; a line torn by a crash mid-write is dropped with a warning."""
        if not exists(p):
            return []
        records = []
        for number, line in enumerate(read_text(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.warning("%s:%d: dropped a torn line (a crash while it was written)", p, number)
        return records

    def append(self, record: dict) -> None:
        self._records.append(record)
        with disk_errors(self.path):
            if self._file is not None:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            else:  # object stores cannot append: write the whole file again
                write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._records))

    def close(self) -> None:
        if self._file is not None:
            with disk_errors(self.path):
                self._file.close()
            self._file = None


def sync_folder(local: str, remote: str | os.PathLike) -> None:
    """Copy every file of the local folder ``local`` to ``remote`` (for TensorBoard
    event files, written locally by tensorboardX, then mirrored to a bucket)."""
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local)
            with open(src, "rb") as f:
                write_bytes(path(remote) / rel, f.read())


@contextlib.contextmanager
def local_copy(folder: str | os.PathLike, *, upload: bool = False) -> Iterator[str]:
    """A local folder holding ``folder``'s files: ``folder`` itself when it is local,
    else a temporary copy (uploaded back on exit with ``upload``), for libraries
    that only read or write local files (tokenizers' ``save_pretrained``)."""
    if is_local(folder):
        if upload:
            os.makedirs(folder, exist_ok=True)
        yield os.fspath(folder)
        return
    remote = path(folder)
    with tempfile.TemporaryDirectory(prefix="jaxfer_") as local:
        if remote.exists():
            for child in remote.iterdir():
                if not child.is_dir():
                    with open(os.path.join(local, child.name), "wb") as f:
                        f.write(child.read_bytes())
        yield local
        if upload:
            sync_folder(local, remote)


# -------------------------------------------------------------------- lock
def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """One run per workdir (see the module docstring); re-entrant within a process.

    ``with Lock(workdir): ...`` or ``acquire()`` / ``release()``. ``refresh()``
    renews the heartbeat (the loop calls it, at most once a minute).
    """

    _held: dict[str, int] = {}  # lock path -> nesting depth in this process

    def __init__(self, workdir: str | os.PathLike, *, stale_after: float = 3600.0):
        self.path = path(workdir) / LOCK_FILE
        self.stale_after = stale_after
        self._last_refresh = 0.0

    def _me(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                "heartbeat": time.time()}

    def _is_mine(self, owner: dict) -> bool:
        me = self._me()
        return owner.get("host") == me["host"] and owner.get("pid") == me["pid"]

    def _stale(self, owner: dict) -> str | None:
        """Why ``owner``'s lock is stale, or ``None`` when that run may be alive."""
        if owner.get("host") == socket.gethostname():
            pid = int(owner.get("pid", -1))
            if pid <= 0 or not _pid_running(pid):
                return f"process {pid} is not running"
            start = _process_start(pid)
            if owner.get("start") is not None and start is not None and start != owner["start"]:
                return f"process {pid} is another process now"
            return None
        age = time.time() - float(owner.get("heartbeat", 0))
        if age > self.stale_after:
            return f"its heartbeat is {age / 60:.0f} minutes old"
        return None

    def _read(self) -> dict | None:
        try:
            owner = json.loads(read_text(self.path))
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed mid-write: stale below

    def _create(self) -> bool:
        """Write our lock if there is none; ``False`` when one exists."""
        data = json.dumps(self._me()).encode()
        if not is_local(self.path):  # object stores: check-then-write (no O_EXCL there)
            if self.path.exists():
                return False
            write_bytes(self.path, data)
            return True
        makedirs(self.path.parent)
        with disk_errors(self.path):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return True

    def acquire(self) -> Lock:
        key = os.fspath(self.path)
        if self._held.get(key):
            self._held[key] += 1
            return self
        for _ in range(3):  # lose a race for a stale lock at most twice
            if self._create():
                break
            owner = self._read()
            if owner is None:
                continue
            if owner and self._is_mine(owner):
                break
            why = self._stale(owner) if owner else "the lock file is unreadable"
            if why is None:
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by another run (host "
                    f"{owner.get('host')}, pid {owner.get('pid')}, lock {self.path}); wait for it "
                    f"to finish, use another --workdir, or delete {self.path} if that run is gone")
            logger.warning("taking over the stale lock %s of host %s pid %s (%s)", self.path,
                           owner.get("host"), owner.get("pid"), why)
            remove(self.path)
        else:
            raise WorkdirError(f"could not take the lock {self.path}: other runs keep taking it")
        self._held[key] = 1
        self._last_refresh = time.time()
        return self

    def refresh(self, every: float = 60.0) -> None:
        """Renew the heartbeat if ``every`` seconds have passed since the last one."""
        if time.time() - self._last_refresh >= every and self._held.get(os.fspath(self.path)):
            write_bytes(self.path, json.dumps(self._me()).encode())
            self._last_refresh = time.time()

    def release(self) -> None:
        key = os.fspath(self.path)
        depth = self._held.get(key, 0)
        if depth > 1:
            self._held[key] = depth - 1
            return
        self._held.pop(key, None)
        if depth:
            owner = self._read()
            if owner and self._is_mine(owner):
                with contextlib.suppress(OSError):
                    self.path.unlink()

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""An in-memory file system under the ``memtest://`` scheme, registered with ``etils.epath``.

It stands for a bucket in the tests: a path layer that works with it (and with
local paths) speaks no local-only API such as ``open``/``os.makedirs`` on its
own. Files live in :data:`FILES` (path -> bytes), folders in :data:`DIRS`.
"""

from __future__ import annotations

import io
import os
import pathlib

from etils import epath
from etils.epath import abstract_path

SCHEME = "memtest://"
_ROOT = "/memtest/"
FILES: dict[str, bytes] = {}
DIRS: set[str] = set()


def reset() -> None:
    FILES.clear()
    DIRS.clear()


class _Writer(io.BytesIO):
    def __init__(self, key: str, initial: bytes = b""):
        super().__init__()
        self.key = key
        self.write(initial)

    def close(self):
        if not self.closed:
            FILES[self.key] = self.getvalue()
        super().close()


@epath.register_path_cls(SCHEME)
class MemPath(abstract_path.Path):
    """``memtest://bucket/a/b`` (stored as the pure path ``/memtest/bucket/a/b``)."""

    def __new__(cls, *parts):
        full = "/".join(os.fspath(p) for p in parts)
        if full.startswith(SCHEME):
            full = _ROOT + full[len(SCHEME):]
        return super().__new__(cls, full)

    def __fspath__(self) -> str:
        return SCHEME + pathlib.PurePosixPath.__str__(self)[len(_ROOT):]

    __str__ = __fspath__

    def __repr__(self) -> str:
        return f"MemPath({str(self)!r})"

    @property
    def key(self) -> str:
        return str(self)

    def exists(self) -> bool:
        return self.key in FILES or self.is_dir()

    def is_dir(self) -> bool:
        return self.key in DIRS or any(k.startswith(self.key + "/") for k in FILES)

    def iterdir(self):
        prefix = self.key + "/"
        names = {k[len(prefix):].split("/")[0] for k in list(FILES) + list(DIRS) if k.startswith(prefix)}
        for name in sorted(names):
            yield self / name

    def glob(self, pattern):
        import fnmatch

        for child in self.iterdir():
            if fnmatch.fnmatch(child.name, pattern):
                yield child

    def walk(self, *, top_down=True, on_error=None):
        raise NotImplementedError

    def mkdir(self, mode=None, parents=False, exist_ok=False):
        if self.exists() and not exist_ok:
            raise FileExistsError(self.key)
        node = self
        while str(node) not in (SCHEME, SCHEME.rstrip("/")) and len(node.parts) > 2:
            DIRS.add(node.key)
            if not parents:
                break
            node = node.parent

    def open(self, mode="r", encoding=None, errors=None, **kwargs):
        if "r" in mode:
            if self.key not in FILES:
                raise FileNotFoundError(self.key)
            data = FILES[self.key]
            return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))
        writer = _Writer(self.key, FILES.get(self.key, b"") if "a" in mode else b"")
        return writer if "b" in mode else io.TextIOWrapper(writer, encoding="utf-8", write_through=True)

    def unlink(self, missing_ok=False):
        if self.key not in FILES:
            if missing_ok:
                return
            raise FileNotFoundError(self.key)
        del FILES[self.key]

    def rmtree(self, missing_ok=False):
        for k in [k for k in FILES if k == self.key or k.startswith(self.key + "/")]:
            del FILES[k]
        DIRS.difference_update({d for d in DIRS if d == self.key or d.startswith(self.key + "/")})

    def rename(self, target):
        target = MemPath(os.fspath(target))
        for k in [k for k in FILES if k == self.key or k.startswith(self.key + "/")]:
            FILES[target.key + k[len(self.key):]] = FILES.pop(k)
        return target

    replace = rename

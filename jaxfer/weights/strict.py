"""Strict loading: checkpoint arrays checked against a model's expected variables.

Everything is keyed by ``(collection, path)``. A mismatch is one of

* missing: the model expects the path, the checkpoint lacks it;
* unexpected: the checkpoint has it (or a key no rule converted), the model does not;
* shape: both have it with different shapes.

All of them are reported together in one :class:`LoadError`, unless a ``reinit``
pattern (tree's glob/``re:`` language, over the path without its collection)
matches the path -- then it takes its fresh initial value -- or, for unexpected
keys, an ``ignore`` pattern matches it. A pattern that matches nothing is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxfer import tree
from jaxfer.errors import JaxferError

Key = tuple[str, str]  # (collection, path)


def show(key: Key) -> str:
    coll, path = key
    return path if coll == "params" else f"{path} [{coll}]"


@dataclasses.dataclass
class LoadReport:
    """What :func:`jaxfer.weights.load` did.

    Attributes:
      source, format, files: where the weights came from.
      loaded: paths filled from the checkpoint.
      reinitialized: ``{path: why}`` for paths matched by ``reinit`` (fresh init).
      initialized: paths of a new head that the checkpoint has no weights for.
      dropped: checkpoint keys not used (head keys of a task checkpoint when no
        head is asked for, or keys matched by ``ignore``), with the reason.
      converted: how many tensors were renamed/transposed from PyTorch names.
      cast: ``{path: "float16->float32"}`` for dtype conversions.
    """

    source: str = ""
    format: str = ""
    files: list[str] = dataclasses.field(default_factory=list)
    loaded: list[str] = dataclasses.field(default_factory=list)
    reinitialized: dict[str, str] = dataclasses.field(default_factory=dict)
    initialized: list[str] = dataclasses.field(default_factory=list)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    converted: int = 0
    cast: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format}); "
                 f"{self.converted} converted from PyTorch names"]
        for title, items in (("re-initialised", self.reinitialized), ("initialised (new head)", self.initialized),
                             ("dropped", self.dropped), ("cast", self.cast)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                for k in items:
                    why = items[k] if isinstance(items, dict) else ""
                    lines.append(f"  {k}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)


class LoadError(JaxferError, ValueError):
    """Checkpoint and model disagree; the message lists every disagreement."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = [f"checkpoint {source} does not fit the model:"]
        if mismatched:
            parts.append(f"shape mismatch ({len(mismatched)}), checkpoint vs model:")
            parts += [f"  {p}: {tuple(a)} vs {tuple(b)}" for p, a, b in mismatched]
        if missing:
            parts.append(f"missing from checkpoint ({len(missing)}):")
            parts += [f"  {p}" for p in missing]
        if unexpected:
            parts.append(f"unexpected in checkpoint ({len(unexpected)}):")
            parts += [f"  {p}" for p in unexpected]
        parts.append("pass reinit=[patterns] for model paths to initialise afresh "
                     "(e.g. reinit=['classifier/**']), or ignore=[patterns] for checkpoint keys to drop.")
        super().__init__("\n".join(parts))


@dataclasses.dataclass
class Plan:
    take: dict[Key, np.ndarray]  # from the checkpoint
    fresh: dict[Key, str]  # from a fresh init, with the reason
    dropped: dict[str, str]


def plan(expected: Mapping[Key, Any], found: Mapping[Key, np.ndarray], unused: Iterable[str] = (), *,
         reinit: Sequence[tree.Pattern] = (), ignore: Sequence[tree.Pattern] = (),
         new: Iterable[Key] = (), source: str = "") -> Plan:
    """Decide, for every expected key, where its value comes from; raise on disagreement.

    ``expected``/``found`` map ``(collection, path)`` to something with ``.shape``;
    ``unused`` are checkpoint key names no rule converted (unexpected unless ignored);
    ``new`` are keys of a freshly attached head, allowed to be missing.
    """
    paths = sorted({p for _, p in expected})
    reinit_rx = [(pat, tree.compile_pattern(pat)) for pat in reinit]
    for pat, rx in reinit_rx:
        if not any(rx.fullmatch(p) for p in paths):
            raise tree.NoMatchError(pat, paths, what="reinit pattern")
    ignore_rx = [(pat, tree.compile_pattern(pat)) for pat in ignore]
    extra = [show(k) for k in found if k not in expected] + [n.replace(".", "/") for n in unused]
    for pat, rx in ignore_rx:
        if not any(rx.fullmatch(e.split(" [")[0]) for e in extra):
            raise tree.NoMatchError(pat, extra, what="ignore pattern")

    def matches(rxs, path):
        return any(rx.fullmatch(path) for _, rx in rxs)

    new = set(new)
    take, fresh, dropped = {}, {}, {}
    missing, mismatched = [], []
    for key, want in expected.items():
        have = found.get(key)
        if matches(reinit_rx, key[1]):
            fresh[key] = ("reinit, not in checkpoint" if have is None
                          else f"reinit, checkpoint shape {tuple(np.shape(have))} -> {tuple(want.shape)}")
        elif have is None:
            if key in new:
                fresh[key] = "new head"
            else:
                missing.append(show(key))
        elif tuple(np.shape(have)) != tuple(want.shape):
            mismatched.append((show(key), tuple(np.shape(have)), tuple(want.shape)))
        else:
            take[key] = have
    unexpected = []
    for e in extra:
        if matches(ignore_rx, e.split(" [")[0]):
            dropped[e] = "ignore"
        else:
            unexpected.append(e)
    if missing or unexpected or mismatched:
        raise LoadError(source, missing, unexpected, mismatched)
    return Plan(take, fresh, dropped)

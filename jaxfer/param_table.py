"""The table that says, for every parameter, whether it trains, at which lr, and why.

``explain(params, rules)`` joins what :mod:`jaxfer.masks` decides (the first
matching rule, the lr multiplier after layer-wise decay, the weight-decay mask)
with each leaf's shape and size, and adds the totals. ``jaxfer inspect`` prints
it for a recipe; ``depth=k`` sums rows per subtree (``bert/encoder/layer/3/**``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from jaxfer import tree
from jaxfer.masks import Mask, PyTree, Rules, as_multiplier, decide, lr_multipliers, resolve


class Row(NamedTuple):
    path: str
    shape: tuple | None  # None for a group of leaves
    count: int
    trainable: bool | str  # "partial" for a group
    lr: float | str  # multiplier after layer decay (0.0 frozen); "a..b" for a mixed group
    weight_decay: bool | str | None  # None: no weight-decay mask given; "mixed" for a group
    decided_by: str


COLUMNS = ("path", "shape", "count", "trainable", "lr mult", "wd", "decided by")


@dataclasses.dataclass(frozen=True)
class Table:
    """What :func:`explain` returns: ``rows``, ``totals`` and an aligned ``str``.

    ``totals`` keys: ``params``, ``trainable``, ``frozen``, ``trainable_pct``,
    ``bytes``, ``trainable_bytes``.
    """

    rows: tuple[Row, ...]
    totals: Mapping[str, float]

    def __str__(self) -> str:
        def cell(v):
            if isinstance(v, bool):
                return "yes" if v else "no"
            if v is None:
                return "-"
            if isinstance(v, tuple):
                return str(v)
            if isinstance(v, int):
                return f"{v:,}"
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)

        body = [COLUMNS] + [tuple(cell(v) for v in row) for row in self.rows]
        widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
        right = {2, 4}  # numbers
        lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                           for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in body]
        lines.insert(1, "-" * len(max(lines, key=len)))
        t = self.totals
        lines += ["-" * len(lines[1]),
                  f"total params: {t['params']:,} ({_human_bytes(t['bytes'])})",
                  f"trainable:    {t['trainable']:,} ({t['trainable_pct']:.2f}%, "
                  f"{_human_bytes(t['trainable_bytes'])})",
                  f"frozen:       {t['frozen']:,}"]
        return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def explain(params: PyTree, rules: Rules = (("**", 1.0),), *, weight_decay_mask: Any = None,
            layer_decay: float | None = None, num_layers: int | None = None, layer_pattern: Any = None,
            depth: int | None = None, strict: bool = True) -> Table:
    """The table of which path is trainable, its size, its lr multiplier and why.

    ``weight_decay_mask`` is a bool tree, a Mask/pattern, or a callable
    ``params -> bool tree`` (as given to ``optax.adamw(mask=...)``), e.g.
    :func:`default_weight_decay_mask`; frozen leaves are never decayed.
    ``depth=k`` sums rows over the first ``k`` path segments.
    """
    decided = decide(params, rules, strict=strict)
    mults = tree.flatten(lr_multipliers(params, rules, strict=False, layer_decay=layer_decay,
                                        num_layers=num_layers, layer_pattern=layer_pattern))
    if weight_decay_mask is None:
        wd = {}
    elif isinstance(weight_decay_mask, Mask) or isinstance(weight_decay_mask, (str, list, re.Pattern)):
        wd = tree.flatten(resolve(weight_decay_mask, params, strict=strict))
    else:
        wd_tree = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        wd = tree.flatten(tree.map_with_path(lambda p, _, m: bool(m), params, wd_tree))
    rows, n, nt, b, bt = [], 0, 0, 0, 0
    for path, leaf in tree.flatten(params).items():
        c, nb = tree.count(leaf), tree.nbytes(leaf)
        trainable = as_multiplier(decided[path].value) is not None
        rows.append(Row(path, tuple(getattr(leaf, "shape", ())), c, trainable, mults[path],
                        (wd[path] and trainable) if path in wd else None, decided[path].text))
        n, b = n + c, b + nb
        nt, bt = nt + c * trainable, bt + nb * trainable
    if depth is not None:
        rows = _group(rows, depth)
    totals = dict(params=n, trainable=nt, frozen=n - nt, trainable_pct=100.0 * nt / max(n, 1),
                  bytes=b, trainable_bytes=bt)
    return Table(tuple(rows), totals)


def _group(rows: list[Row], depth: int) -> list[Row]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(tree.SEP.join(r.path.split(tree.SEP)[:depth]), []).append(r)

    def one(values, mixed="mixed"):
        values = list(dict.fromkeys(values))
        return values[0] if len(values) == 1 else mixed

    out = []
    for key, rs in groups.items():
        if len(rs) == 1 and rs[0].path == key:
            out.append(rs[0])
            continue
        lrs = [r.lr for r in rs]
        lr = lrs[0] if len(set(lrs)) == 1 else f"{min(lrs):.4g}..{max(lrs):.4g}"
        out.append(Row(key + tree.SEP + "**", None, sum(r.count for r in rs),
                       one([r.trainable for r in rs], "partial"), lr, one([r.weight_decay for r in rs]),
                       ", ".join(dict.fromkeys(r.decided_by for r in rs))))
    return out

"""What a run writes besides checkpoints: ``config.json``, ``metrics.jsonl``, TensorBoard, ``curves.png``.

Written by process 0 only, through :mod:`jaxfer.workdir` (so a ``gs://``
workdir gets them too; TensorBoard events are written locally by tensorboardX
and mirrored there). On resume, records after the restored step are dropped,
so ``metrics.jsonl`` reads like one run. A NaN or inf is never written as a
number: it becomes ``null`` (strict JSON), and TensorBoard skips it.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from jaxfer import workdir as workdir_lib


def finite_or_none(x: Any) -> Any:
    """``x`` with every non-finite float (also inside dicts) replaced by ``None``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    return x


def scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a record (not ``step``), as floats."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class RunLog:
    """``metrics.jsonl``, TensorBoard and the history list (files on process 0 only)."""

    def __init__(self, workdir: str | None, resumed_step: int | None, config: Any):
        from jaxfer.train.checkpoint import to_jsonable

        self.history: list[dict] = []
        self.workdir = workdir if workdir and jax.process_index() == 0 else None
        self._jsonl = self._tb = self._tb_local = None
        if self.workdir is None:
            return
        root = workdir_lib.makedirs(self.workdir)
        if config is not None:
            workdir_lib.write_json(root / "config.json", to_jsonable(config), indent=2)
        if resumed_step is not None:  # drop the records of a killed run after the restore
            old = workdir_lib.JsonLines.read(root / "metrics.jsonl")
            self.history = [r for r in old if r.get("step", 0) <= resumed_step]
        self._jsonl = workdir_lib.JsonLines(root / "metrics.jsonl", self.history)
        from tensorboardX import SummaryWriter

        local = workdir_lib.is_local(root)
        self._tb_local = os.fspath(root / "tb") if local else tempfile.mkdtemp(prefix="jaxfer_tb_")
        self._tb_remote = None if local else root / "tb"
        with workdir_lib.disk_errors(self._tb_local):
            self._tb = SummaryWriter(self._tb_local)

    def write(self, record: dict) -> None:
        record = finite_or_none(record)
        self.history.append(record)
        if self._jsonl is None:
            return
        self._jsonl.append(record)
        with workdir_lib.disk_errors(self._tb_local):
            for name, value in scalars(record).items():
                self._tb.add_scalar(f"{record.get('split', 'train')}/{name}", value, record["step"])
            self._tb.flush()
        if self._tb_remote is not None:
            workdir_lib.sync_folder(self._tb_local, self._tb_remote)

    def close(self) -> None:
        if self._jsonl is None:
            return
        self._jsonl.close()
        self._tb.close()
        if self._tb_remote is not None:
            workdir_lib.sync_folder(self._tb_local, self._tb_remote)
            shutil.rmtree(self._tb_local, ignore_errors=True)
        workdir_lib.write_bytes(workdir_lib.path(self.workdir) / "curves.png", plot_curves(self.history))
        self._jsonl = None


def plot_curves(history: Sequence[dict], path: str | os.PathLike | None = None) -> bytes:
    """A PNG of train loss and every scalar eval metric against steps (Agg, no pyplot);
    written to ``path`` when given, returned as bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def xy(records, key):
        kept = [r for r in records if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in kept], [r[key] for r in kept]

    train = [r for r in history if r.get("split") == "train"]
    evals = [r for r in history if r.get("split") == "eval"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    ax_train.plot(*xy(train, "loss"), label="train loss")
    if evals:
        ax_train.plot(*xy(evals, "loss"), "o-", label="eval loss")
    ax_train.set(xlabel="step", title="loss")
    ax_train.legend()
    names = [k for k in scalars(evals[0]) if k not in ("loss", "num_examples")] if evals else []
    for name in names:
        ax_eval.plot(*xy(evals, name), "o-", label=name)
    ax_eval.set(xlabel="step", title="eval metrics")
    if names:
        ax_eval.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    data = buffer.getvalue()
    if path is not None:
        workdir_lib.write_bytes(path, data)
    return data

"""Figures of a classification run, as PNG files (matplotlib's Agg canvas, no pyplot state).

* :func:`confusion_matrix_png` -- counts with row-normalised shading (rows: true
  class, columns: predicted, as :func:`jaxfer.metrics.confusion_matrix`);
* :func:`prediction_grid_png` -- images with their predicted and true labels,
  green when they agree and red when not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_png(path: str, confusion, label_names: Sequence[str], *, title: str = "") -> str:
    """Write ``confusion`` (``C x C`` counts) as a heat map with the counts printed; returns ``path``."""
    cm = np.asarray(confusion, np.int64)
    c = len(label_names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {c} label names")
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * c
    fig = _figure(size + 1.0, size)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(c), yticks=range(c), xticklabels=label_names, yticklabels=label_names,
           xlabel="predicted", ylabel="true", title=title or f"confusion matrix ({cm.sum()} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def prediction_grid_png(path: str, images: Sequence[np.ndarray], true: Sequence[int], predicted: Sequence[int],
                        label_names: Sequence[str], *, probabilities: Sequence[float] | None = None,
                        columns: int = 6, title: str = "") -> str:
    """Write a grid of ``images`` (HW grey or HWC uint8) titled ``pred / true`` (and the
    predicted class's probability); returns ``path``."""
    n = len(images)
    if not n or not len(true) == len(predicted) == n:
        raise ValueError(f"need as many labels as images, got {n} images, {len(true)} true, {len(predicted)} predicted")
    columns = min(columns, n)
    rows = -(-n // columns)
    fig = _figure(2.0 * columns, 2.25 * rows + (0.4 if title else 0.0))
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(-1)
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= n:
            continue
        img = np.asarray(images[k])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        ok = int(true[k]) == int(predicted[k])
        prob = f" {probabilities[k]:.2f}" if probabilities is not None else ""
        ax.set_title(f"pred {label_names[int(predicted[k])]}{prob}\ntrue {label_names[int(true[k])]}",
                     fontsize=8, color="green" if ok else "red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path

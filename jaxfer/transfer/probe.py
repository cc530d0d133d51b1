"""Linear heads on fixed features: logistic regression, ridge, few-shot evaluation.

Given features ``X`` (``n x d``) and integer labels ``y`` of ``C`` classes, a head
is ``(W, b)`` with logits ``X W + b``.

* :func:`logistic_regression` minimises, full batch,

  ``L(W, b) = mean_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||^2``

  (the bias is not penalised) with optax L-BFGS (zoom line search) or Adam.
  The features are standardised first (per-dimension mean and std of the
  training rows) and the scaling is folded back into ``W, b``, so the
  result applies to raw features.
* :func:`ridge`: closed-form least squares onto one-hot targets,
  ``W = (Xc^T Xc + l2 I)^-1 Xc^T Yc`` on centred ``Xc, Yc``, ``b = mean(Y) - mean(X) W``.
* :func:`select_l2`: the ``l2`` of a grid with the best validation metric.
* :func:`few_shot`: ``k`` examples per class drawn with each of several seeds,
  a head fitted on them, metrics on the evaluation rows: mean and std over seeds.

:func:`as_head_params` turns ``(W, b)`` into a ``Classifier``'s ``{"kernel", "bias"}``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfer import metrics as metrics_lib

Head = tuple[np.ndarray, np.ndarray]
SOLVERS = ("lbfgs", "adam", "ridge")


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-30), std, 1.0)
    return (x - mean) / std, mean, std


def _unstandardise(w: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Head:
    """``((x - m) / s) W + b = x (W / s) + (b - (m / s) W)``."""
    w_raw = w / std[:, None]
    return w_raw.astype(np.float32), (b - mean @ w_raw).astype(np.float32)


def _objective(x, y, num_classes: int, l2: float):
    def loss(theta):
        w, b = theta
        logits = x @ w + b
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(w * w)

    return loss


def logistic_regression(x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float = 1e-3,
                        solver: str = "lbfgs", steps: int = 500, lr: float = 1e-2,
                        tol: float = 1e-6) -> Head:
    """Multinomial logistic regression, full batch (see the module docstring).

    ``solver="lbfgs"`` runs up to ``steps`` L-BFGS iterations and stops when the
    gradient norm falls below ``tol``; ``"adam"`` takes ``steps`` Adam steps of
    size ``lr``. Returns ``(W (d, C), b (C,))`` float32 for raw features.
    """
    if solver not in ("lbfgs", "adam"):
        raise ValueError(f"unknown solver {solver!r}; logistic_regression takes 'lbfgs' or 'adam'")
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    y = np.asarray(y).astype(np.int32)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as feature rows (> 0), got {len(x)} rows, {len(y)} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    xs, mean, std = _standardise(x)
    w, b = _fit(jnp.asarray(xs), jnp.asarray(y), num_classes, float(l2), solver, int(steps), float(lr),
                float(tol))
    return _unstandardise(np.asarray(w, np.float64), np.asarray(b, np.float64), mean, std)


@functools.partial(jax.jit, static_argnames=("num_classes", "solver", "steps"))
def _fit(x, y, num_classes, l2, solver, steps, lr, tol):
    loss = _objective(x, y, num_classes, l2)
    theta = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
    if solver == "adam":
        opt = optax.adam(lr)

        def body(_, carry):
            theta, state = carry
            g = jax.grad(loss)(theta)
            updates, state = opt.update(g, state, theta)
            return optax.apply_updates(theta, updates), state

        theta, _ = jax.lax.fori_loop(0, steps, body, (theta, opt.init(theta)))
        return theta
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def cond(carry):
        _, state, i = carry
        grad = optax.tree.get(state, "grad")
        return (i < steps) & (optax.tree.norm(grad) > tol)

    def body(carry):
        theta, state, i = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(theta, updates), state, i + 1

    state = opt.init(theta)
    # the first iteration always runs (the initial state's grad is a zero placeholder)
    theta, state, i = body((theta, state, 0))
    theta, _, _ = jax.lax.while_loop(cond, body, (theta, state, i))
    return theta


def ridge(x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float = 1.0) -> Head:
    """Closed-form ridge regression onto one-hot targets (float64 normal equations)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    targets = np.eye(num_classes)[np.asarray(y).astype(int)]
    mx, my = x.mean(0), targets.mean(0)
    xc, yc = x - mx, targets - my
    w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ yc)
    return w.astype(np.float32), (my - mx @ w).astype(np.float32)


def fit(solver: str, x, y, *, num_classes: int, l2: float, **kw) -> Head:
    """``ridge`` or ``logistic_regression`` by name (one of :data:`SOLVERS`)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown probe solver {solver!r}; choose one of {SOLVERS}")
    if solver == "ridge":
        return ridge(x, y, num_classes=num_classes, l2=l2)
    return logistic_regression(x, y, num_classes=num_classes, l2=l2, solver=solver, **kw)


def logits(head: Head, x: np.ndarray) -> np.ndarray:
    w, b = head
    return np.asarray(x, np.float32).reshape(len(x), -1) @ w + b


def report(head: Head, x, y, label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`jaxfer.metrics.compute` of the head's predictions on ``(x, y)``."""
    return metrics_lib.compute("classification", logits(head, x), np.asarray(y), label_names)


def select_l2(solver: str, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
              grid: Sequence[float], *, num_classes: int, metric: str = "accuracy", **kw
              ) -> tuple[float, Head, list[dict[str, float]]]:
    """Fit one head per ``l2`` in ``grid`` on ``train``; keep the best on ``validation``.

    Returns ``(l2, head, scores)`` with ``scores`` a list of ``{"l2", metric}``;
    ties go to the larger ``l2`` (the simpler head).
    """
    if not grid:
        raise ValueError("select_l2 needs at least one l2 value")
    scores, best = [], None
    for l2 in sorted(grid, reverse=True):
        head = fit(solver, *train, num_classes=num_classes, l2=l2, **kw)
        score = float(report(head, *validation)[metric])
        scores.append({"l2": float(l2), metric: score})
        if best is None or score > best[0]:
            best = (score, float(l2), head)
    return best[1], best[2], sorted(scores, key=lambda s: s["l2"])


def few_shot(x, y, x_eval, y_eval, *, shots: int, num_classes: int, seeds: Sequence[int] = (0, 1, 2, 3, 4),
             solver: str = "lbfgs", l2: float = 1e-2, metrics: Sequence[str] = ("accuracy", "macro_f1"),
             **kw) -> dict[str, Any]:
    """``shots`` examples per class drawn (without replacement) from ``(x, y)`` with
    each seed; a head fitted on them and scored on ``(x_eval, y_eval)``.

    Returns ``{metric: {"mean", "std", "runs"}}`` plus ``shots`` and ``seeds``
    (``std`` over seeds, ``ddof=0``). A class with fewer than ``shots`` examples
    is an error.
    """
    y = np.asarray(y)
    counts = np.bincount(y.astype(int), minlength=num_classes)
    if counts.min() < shots:
        raise ValueError(f"{shots}-shot needs {shots} examples of every class; class "
                         f"{int(counts.argmin())} has {int(counts.min())}")
    runs: dict[str, list[float]] = {m: [] for m in metrics}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pick = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False)
                               for c in range(num_classes)])
        head = fit(solver, np.asarray(x)[pick], y[pick], num_classes=num_classes, l2=l2, **kw)
        rep = report(head, x_eval, y_eval)
        for m in metrics:
            runs[m].append(float(rep[m]))
    out: dict[str, Any] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                           for m, v in runs.items()}
    out.update(shots=shots, seeds=list(seeds))
    return out


def as_head_params(head: Head) -> dict[str, np.ndarray]:
    """``(W, b)`` as a ``Classifier``'s params ``{"kernel": W, "bias": b}``."""
    w, b = head
    return {"kernel": np.asarray(w, np.float32), "bias": np.asarray(b, np.float32)}


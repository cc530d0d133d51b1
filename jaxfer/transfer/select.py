"""Transferability scores: which pretrained model to start from, before training it.

Each score is a jit-compiled function of arrays computed on the *target*
training data, once per candidate model; a higher score predicts better
accuracy after fine-tuning that candidate (compare scores of candidates on the
same data, never across datasets). ``labels`` are integer class ids
``[N]`` in ``[0, num_classes)``; ``num_classes`` is static (inferred from
concrete labels when not given).

* :func:`logme` -- LogME (You et al., 2021): the log marginal evidence
  ``log p(y | F)`` of a Bayesian linear model on the features, maximised over
  its prior precision ``alpha`` and noise precision ``beta``, per example,
  averaged over the one-hot columns of the labels.
* :func:`leep` -- LEEP (Nguyen et al., 2020): the log-likelihood of the
  "expected empirical predictor" that maps the source model's predicted label
  distribution through the empirical ``P(y | z)``.
* :func:`nce` -- NCE (Tran et al., 2019): ``-H(Y | Z)``, the negative conditional
  entropy of target labels given the source model's hard labels.
* :func:`h_score` -- H-score (Bao et al., 2019): ``tr(cov(f)^-1 cov(E[f | y]))``;
  :func:`shrinkage_h_score` (Ibrahim et al., 2022) swaps ``cov(f)`` for its
  Ledoit-Wolf shrinkage estimate, which stays well conditioned when the
  feature dimension is large next to the number of examples.
* :func:`transrate` -- TransRate (Huang et al., 2022): the coding-rate mutual
  information ``R(Z) - R(Z | Y)`` of the features and the labels.

All scores are computed in float32 (features are centred first where the
score is translation invariant). ``jaxfer rank`` computes them for several
candidates; see :mod:`jaxfer.transfer.rank`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SCORES = ("logme", "leep", "nce", "h_score", "shrinkage_h_score", "transrate")


def _num_classes(labels, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    try:
        labels = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("num_classes is required when labels are traced") from None
    if labels.size == 0:
        raise ValueError("no labels")
    return int(labels.max()) + 1


def _one_hot(labels, num_classes: int) -> jax.Array:
    return jax.nn.one_hot(jnp.asarray(labels, jnp.int32).reshape(-1), num_classes, dtype=jnp.float32)


def _xlogy(x, y):
    return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, y, 1.0)), 0.0)


# ------------------------------------------------------------------- LogME
@functools.partial(jax.jit, static_argnames=("max_iter",))
def _logme_targets(features, targets, tol, max_iter: int = 100):
    """Mean over the columns of ``targets`` ``[N, K]`` of the maximised evidence / N."""
    f = jnp.asarray(features, jnp.float32)
    n, d = f.shape
    u, sigma, vt = jnp.linalg.svd(f, full_matrices=False)  # f = u diag(sigma) vt
    s = sigma ** 2                                         # eigenvalues of f^T f (the rest are 0)
    rank_gap = d - s.shape[0]                              # zero eigenvalues when d > n

    def evidence(y):
        proj = vt @ (f.T @ y)          # v^T f^T y, the only part of f^T y that is not 0

        def fit(alpha, beta):
            m_coef = beta * proj / (alpha + beta * s)      # posterior mean, in the v basis
            alpha_de = jnp.sum(m_coef ** 2)
            beta_de = jnp.sum((y - u @ (sigma * m_coef)) ** 2)
            gamma = jnp.sum(beta * s / (alpha + beta * s))
            return alpha_de, beta_de, gamma

        def body(carry):
            alpha, beta, _, i = carry
            alpha_de, beta_de, gamma = fit(alpha, beta)
            new_alpha = gamma / jnp.maximum(alpha_de, 1e-30)
            new_beta = (n - gamma) / jnp.maximum(beta_de, 1e-30)
            change = jnp.abs(new_alpha / new_beta - alpha / beta) / (alpha / beta)
            return new_alpha, new_beta, change, i + 1

        def cond(carry):
            return (carry[2] > tol) & (carry[3] < max_iter)

        one = jnp.ones((), jnp.float32)
        alpha, beta, _, _ = jax.lax.while_loop(cond, body, (one, one, jnp.asarray(jnp.inf), 0))
        alpha_de, beta_de, _ = fit(alpha, beta)
        log_ev = (d / 2 * jnp.log(alpha) + n / 2 * jnp.log(beta)
                  - 0.5 * jnp.sum(jnp.log(alpha + beta * s)) - 0.5 * rank_gap * jnp.log(alpha)
                  - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * jnp.log(2 * jnp.pi))
        return log_ev / n

    return jnp.mean(jax.vmap(evidence, in_axes=1)(jnp.asarray(targets, jnp.float32)))


def logme(features, labels, num_classes: int | None = None, *, tol: float = 1e-3,
          max_iter: int = 100) -> jax.Array:
    """LogME of ``features`` ``[N, D]`` for integer ``labels`` ``[N]``.

    For each class, ``y`` is its one-hot column and the model is
    ``y = F w + noise``, ``w ~ N(0, 1/alpha)``, ``noise ~ N(0, 1/beta)``. With
    ``F^T F = V diag(s) V^T`` the evidence is maximised by the fixed point

        gamma = sum_i beta s_i / (alpha + beta s_i),   m = beta (alpha I + beta F^T F)^-1 F^T y
        alpha = gamma / |m|^2,                          beta = (N - gamma) / |y - F m|^2

    (iterated from ``alpha = beta = 1`` until ``alpha/beta`` changes by less than
    ``tol``, relatively), and the score is the log evidence

        D/2 log alpha + N/2 log beta - 1/2 sum_i log(alpha + beta s_i)
        - beta/2 |y - F m|^2 - alpha/2 |m|^2 - N/2 log(2 pi)

    divided by ``N``, averaged over classes. Use more examples than feature
    dimensions: with ``N <= D`` a class can be fitted exactly and ``beta`` grows
    without bound. ``labels`` may also be float
    regression targets ``[N]`` or ``[N, K]`` (``num_classes=0``): then the columns are the targets.
    """
    labels = jnp.asarray(labels)
    if num_classes == 0 or jnp.issubdtype(labels.dtype, jnp.floating):
        targets = labels.reshape(labels.shape[0], -1)
    else:
        targets = _one_hot(labels, _num_classes(labels, num_classes))
    return _logme_targets(features, targets, jnp.float32(tol), max_iter=max_iter)


# -------------------------------------------------------------- LEEP / NCE
@functools.partial(jax.jit, static_argnames=("num_classes",))
def _leep(source_probs, labels, num_classes: int):
    theta = jnp.asarray(source_probs, jnp.float32)       # [N, Z]
    y = _one_hot(labels, num_classes)                     # [N, C]
    joint = y.T @ theta / theta.shape[0]                  # P(y, z)  [C, Z]
    conditional = joint / jnp.maximum(joint.sum(0, keepdims=True), 1e-30)   # P(y | z)
    eep = theta @ conditional.T                           # [N, C]: sum_z P(y | z) theta(z)
    return jnp.mean(jnp.log(jnp.sum(eep * y, axis=1)))


def leep(source_probs, labels, num_classes: int | None = None) -> jax.Array:
    """LEEP from the source model's predicted distribution ``source_probs`` ``[N, Z]``
    over its own ``Z`` labels (softmax of its logits) and the target ``labels`` ``[N]``.

        P(y, z) = 1/N sum_i theta_i(z) [y_i = y],   P(y | z) = P(y, z) / sum_y P(y, z)
        LEEP = 1/N sum_i log sum_z P(y_i | z) theta_i(z)          (<= 0; 0 is best)
    """
    return _leep(source_probs, labels, _num_classes(labels, num_classes))


@functools.partial(jax.jit, static_argnames=("num_source", "num_classes"))
def _nce(source_labels, labels, num_source: int, num_classes: int):
    z = _one_hot(source_labels, num_source)
    y = _one_hot(labels, num_classes)
    joint = z.T @ y / z.shape[0]                          # P(z, y)
    p_z = joint.sum(1, keepdims=True)
    return jnp.sum(_xlogy(joint, joint / jnp.maximum(p_z, 1e-30)))


def nce(source_labels, labels, num_classes: int | None = None,
        num_source_classes: int | None = None) -> jax.Array:
    """NCE ``= -H(Y | Z) = sum_{z,y} P(z, y) log P(y | z)`` from the source model's hard
    labels ``source_labels`` ``[N]`` (argmax of its predictions) and target ``labels``.

    0 when the target label is a function of the source label; ``<= 0`` otherwise.
    """
    return _nce(source_labels, labels, _num_classes(source_labels, num_source_classes),
                _num_classes(labels, num_classes))


# --------------------------------------------------------------- H-scores
def _class_mean_cov(f, y):
    """``cov(E[f | y])``: the covariance of each example's class-mean feature."""
    counts = y.sum(0)                                     # [C]
    means = (y.T @ f) / jnp.maximum(counts, 1.0)[:, None]  # [C, D] (f centred: mean 0)
    weights = counts / f.shape[0]
    return (means * weights[:, None]).T @ means


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _h_score(features, labels, num_classes: int, rcond):
    f = jnp.asarray(features, jnp.float32)
    f = f - f.mean(0)
    cov = f.T @ f / f.shape[0]
    return jnp.trace(jnp.linalg.pinv(cov, rtol=rcond, hermitian=True)
                     @ _class_mean_cov(f, _one_hot(labels, num_classes)))


def h_score(features, labels, num_classes: int | None = None, *, rcond: float = 1e-6) -> jax.Array:
    """H-score ``tr(cov(f)^+ cov(E[f | y]))`` of ``features`` ``[N, D]``.

    ``^+`` is the pseudo-inverse (singular values below ``rcond`` times the
    largest are dropped). Invariant to any invertible affine map of the features.
    """
    return _h_score(features, labels, _num_classes(labels, num_classes), jnp.float32(rcond))


def ledoit_wolf_shrinkage(features) -> jax.Array:
    """The Ledoit-Wolf shrinkage intensity ``alpha`` in ``[0, 1]`` of ``features`` ``[N, D]``.

    With ``X`` centred, ``S = X^T X / N``, ``mu = tr(S) / D``, the optimal weight of
    ``mu I`` in ``(1 - alpha) S + alpha mu I`` is ``min(b2, d2) / d2`` where
    ``d2 = |S - mu I|_F^2 / D`` and ``b2 = (1 / (N^2 D)) sum_i |x_i x_i^T - S|_F^2``
    (the same estimate as ``sklearn.covariance.ledoit_wolf_shrinkage``).
    """
    x = jnp.asarray(features, jnp.float32)
    x = x - x.mean(0)
    n, d = x.shape
    s = x.T @ x / n
    mu = jnp.trace(s) / d
    d2 = (jnp.sum(s ** 2) - 2 * mu * jnp.trace(s) + d * mu ** 2) / d
    # sum_i |x_i x_i^T - S|_F^2 = sum_i |x_i|^4 - N |S|_F^2
    b2 = (jnp.sum(jnp.sum(x ** 2, 1) ** 2) - n * jnp.sum(s ** 2)) / (n ** 2 * d)
    b2 = jnp.minimum(b2, d2)
    return jnp.where(d2 > 0, b2 / jnp.where(d2 > 0, d2, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _shrinkage_h_score(features, labels, num_classes: int):
    f = jnp.asarray(features, jnp.float32)
    f = f - f.mean(0)
    n, d = f.shape
    alpha = ledoit_wolf_shrinkage(f)
    cov = f.T @ f / n
    shrunk = (1 - alpha) * cov + alpha * jnp.trace(cov) / d * jnp.eye(d, dtype=f.dtype)
    between = (1 - alpha) * _class_mean_cov(f, _one_hot(labels, num_classes))
    return jnp.trace(jnp.linalg.solve(shrunk, between))


def shrinkage_h_score(features, labels, num_classes: int | None = None) -> jax.Array:
    """H-score with a shrinkage covariance: ``tr(S_a^-1 (1 - a) cov(E[f | y]))``,
    ``S_a = (1 - a) cov(f) + a tr(cov(f))/D I``, ``a`` = :func:`ledoit_wolf_shrinkage`."""
    return _shrinkage_h_score(features, labels, _num_classes(labels, num_classes))


# --------------------------------------------------------------- TransRate
def _coding_rate(gram, n, d, eps):
    """``R = 1/2 logdet(I + D / (n eps^2) Z^T Z)`` from ``gram = Z^T Z``."""
    scale = d / (jnp.maximum(n, 1.0) * eps ** 2)
    return 0.5 * jnp.linalg.slogdet(jnp.eye(d, dtype=gram.dtype) + scale * gram)[1]


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _transrate(features, labels, num_classes: int, eps):
    z = jnp.asarray(features, jnp.float32)
    z = z - z.mean(0)
    n, d = z.shape
    y = _one_hot(labels, num_classes)
    whole = _coding_rate(z.T @ z, n, d, eps)

    def per_class(mask):
        count = mask.sum()
        return count / n * _coding_rate((z * mask[:, None]).T @ z, count, d, eps)

    return whole - jnp.sum(jax.vmap(per_class, in_axes=1)(y))


def transrate(features, labels, num_classes: int | None = None, *, eps: float = 1.0) -> jax.Array:
    """TransRate ``R(Z) - R(Z | Y)`` of centred features ``Z`` ``[N, D]``:

        R(Z)     = 1/2 logdet(I + D / (N eps^2) Z^T Z)
        R(Z | Y) = sum_k N_k / N * 1/2 logdet(I + D / (N_k eps^2) Z_k^T Z_k)

    the coding rate of all features minus that of each class's features
    (``Z_k``: the ``N_k`` rows of class ``k``). ``eps`` is the distortion, in the
    units of the features: compare candidates at one ``eps``; ``jaxfer rank``
    first scales each candidate's features to unit mean squared norm.
    """
    return _transrate(features, labels, _num_classes(labels, num_classes), jnp.float32(eps))

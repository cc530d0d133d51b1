"""Unsupervised domain adaptation: labelled source data, unlabelled target data.

Pure functions of arrays (and one small Linen module), to be added to the
supervised loss of a model trained on both domains at once:

* :func:`gradient_reversal` -- identity forward, ``-lambda`` times the gradient
  backward (``jax.custom_vjp``); :func:`dann_lambda` is DANN's schedule
  ``2 / (1 + exp(-gamma p)) - 1`` over training progress ``p`` in ``[0, 1]``.
* :class:`DomainDiscriminator` -- an MLP giving one domain logit per example,
  behind a gradient reversal layer: training it to tell the domains apart
  trains the feature extractor to make them indistinguishable.
* :func:`domain_adversarial_loss` -- the discriminator's binary cross-entropy
  (DANN, Ganin et al., 2016); with :func:`multilinear_map` (or
  :func:`randomized_multilinear_map`) of features and class predictions as its
  input it is CDAN, and with :func:`entropy_weights` CDAN+E (Long et al., 2018).
* :func:`coral` -- distance of the feature covariances (Deep CORAL, Sun and
  Saenko, 2016); :func:`mk_mmd` -- multi-kernel maximum mean discrepancy (DAN,
  Long et al., 2015); :func:`mcc` -- minimum class confusion on target
  predictions (Jin et al., 2020).
* :func:`adabn` -- re-estimate every batch norm's statistics on target data
  (AdaBN, Li et al., 2016); no training.

Training with them (what a recipe's ``adapt.method`` switches on):

* :class:`DomainClassifier` -- a ``heads.Classifier`` that also returns the
  pooled ``features`` and, for the adversarial methods, ``domain_logits`` from
  its :class:`DomainDiscriminator` (``classifier/discriminator/...``, trained
  with the head); its gradient reversal follows :func:`dann_lambda` over the
  training calls it counts in the ``adapt`` collection (checkpointed with the
  model state, so a resumed run continues the schedule).
* :func:`term` -- the method's loss term ``term(outputs, batch)``, added with
  :func:`jaxfer.transfer.regularizers.add_terms`; batches come from
  :class:`jaxfer.data.mixture.Mixture` with ``part_key="domain"`` (source rows
  0 with labels, target rows 1 with labels hidden). On batches without a
  ``domain`` column (evaluation) every term is 0.

Every loss here is a *batch-level* term: it is computed over the rows of one
batch (source and target rows together), not per example. Under gradient
accumulation (``optim.accumulate = k``) it is computed per micro-batch, and
the step averages the micro-batch values; under ``pmap`` it is computed per
device. Rows are selected by ``domain`` (0 = source, 1 = target) and an
optional ``mask`` (0 for padding rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfer.models import heads
from jaxfer.train import step as step_lib

SOURCE, TARGET = 0, 1
DOMAIN_KEY = "domain"
METHODS = ("none", "dann", "cdan", "cdan+e", "coral", "mmd", "mcc", "adabn")
ADVERSARIAL = ("dann", "cdan", "cdan+e")


# ------------------------------------------------------- gradient reversal
@jax.custom_vjp
def gradient_reversal(x, lam):
    """``x`` forward; the gradient ``g`` flowing back becomes ``-lam * g`` (none to ``lam``)."""
    return x


def _reversal_fwd(x, lam):
    return x, lam


def _reversal_bwd(lam, g):
    return jax.tree_util.tree_map(lambda t: (-lam * t).astype(t.dtype), g), jnp.zeros_like(lam)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


def dann_lambda(progress, gamma: float = 10.0, max_value: float = 1.0):
    """DANN's schedule ``max_value * (2 / (1 + exp(-gamma * p)) - 1)``: 0 at ``p = 0``,
    rising to ``max_value`` as training progress ``p = step / total`` reaches 1, so the
    noisy early discriminator does not disturb the features."""
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return max_value * (2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0)


class DomainDiscriminator(nn.Module):
    """``gradient_reversal(x, lam) -> [Dense(hidden) -> ReLU -> Dropout] * layers -> Dense(1)``.

    Returns one logit per row (``[B]``): the log-odds that the row comes from the
    source domain.
    """

    hidden: int = 256
    layers: int = 2
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x, lam=1.0, *, train: bool = False):
        x = gradient_reversal(x, jnp.asarray(lam, x.dtype))
        for i in range(self.layers):
            x = nn.relu(nn.Dense(self.hidden, name=f"dense_{i}")(x))
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return nn.Dense(1, name="out")(x)[..., 0]


class DomainClassifier(heads.Classifier):
    """A classifier head that also gives what adaptation terms need.

    Returns ``{"logits", "features"}`` (``features``: the pooled backbone
    output the Dense reads, before dropout) and, when ``method`` is adversarial,
    ``"domain_logits"``: the discriminator on ``gradient_reversal(features)``
    (DANN) or on the multilinear map of features and the detached class
    probabilities (CDAN, CDAN+E). The map is randomized (fixed Gaussian
    ``R_f``, ``R_g`` from ``seed``, ``random_dim`` wide) when ``D * C`` exceeds
    ``map_limit``.

    The reversal coefficient is ``dann_lambda(calls / total_calls, gamma,
    max_lambda)``, ``calls`` counting training-mode calls (``adapt/calls``): give
    ``total_calls = steps * micro_batches``.
    """

    method: str = "dann"
    hidden: int = 256
    layers: int = 2
    disc_dropout: float = 0.5
    total_calls: int = 1000
    gamma: float = 10.0
    max_lambda: float = 1.0
    map_limit: int = 4096
    random_dim: int = 1024
    seed: int = 0

    @nn.compact
    def __call__(self, outputs, attention_mask=None, *, train: bool = False):
        features = heads.pool(outputs, self.pooling or "cls", attention_mask)
        logits = self.project(features, train=train)
        result = {"logits": logits, "features": features}
        if self.method not in ADVERSARIAL:
            return result
        calls = self.variable("adapt", "calls", lambda: jnp.zeros((), jnp.int32))
        lam = dann_lambda(calls.value / self.total_calls, self.gamma, self.max_lambda)
        if train and not self.is_initializing():
            calls.value = calls.value + 1
        x = features
        if self.method != "dann":
            probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), -1)).astype(x.dtype)
            d, c = x.shape[-1], probs.shape[-1]
            if d * c <= self.map_limit:
                x = multilinear_map(x, probs)
            else:
                kf, kg = jax.random.split(jax.random.key(self.seed))
                x = randomized_multilinear_map(x, probs, jax.random.normal(kf, (d, self.random_dim), x.dtype),
                                               jax.random.normal(kg, (c, self.random_dim), x.dtype))
        disc = DomainDiscriminator(self.hidden, self.layers, self.disc_dropout, name="discriminator")
        result["domain_logits"] = disc(x, lam, train=train)
        return result


def term(method: str, *, temperature: float = 2.5):
    """The batch-level loss term of ``method`` as ``term(outputs, batch) -> scalar``.

    ``dann``/``cdan``: :func:`domain_adversarial_loss` of ``outputs["domain_logits"]``;
    ``cdan+e`` weights it by :func:`entropy_weights` of the class probabilities;
    ``coral``/``mmd``: :func:`coral`/:func:`mk_mmd` of ``outputs["features"]``;
    ``mcc``: :func:`mcc` of the target rows' logits. 0 when the batch has no
    ``domain`` column. ``none``/``adabn`` have no term (``None``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; choose one of {METHODS}")
    if method in ("none", "adabn"):
        return None

    def fn(outputs, batch):
        if DOMAIN_KEY not in batch:
            return jnp.zeros((), jnp.float32)
        domain, mask = batch[DOMAIN_KEY], batch.get("mask")
        if method in ADVERSARIAL:
            weights = None
            if method == "cdan+e":
                weights = entropy_weights(jax.nn.softmax(outputs["logits"].astype(jnp.float32), -1))
            return domain_adversarial_loss(outputs["domain_logits"], domain, weights=weights, mask=mask)
        if method == "coral":
            return coral(outputs["features"], domain, mask=mask)
        if method == "mmd":
            return mk_mmd(outputs["features"], domain, mask=mask)
        return mcc(outputs["logits"], domain, temperature=temperature, mask=mask)

    return fn


# -------------------------------------------------------- row selections
def _rows(domain, mask, which: int, like):
    w = (jnp.asarray(domain) == which).astype(jnp.float32)
    if mask is not None:
        w = w * jnp.asarray(mask, jnp.float32)
    return w.reshape(-1, *(1,) * (like.ndim - 1))


def _mean_over(values, weights):
    weights = weights.reshape(values.shape)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


# ---------------------------------------------------- adversarial losses
def domain_adversarial_loss(domain_logits, domain, *, weights=None, mask=None):
    """Binary cross-entropy of the discriminator: source rows have target 1, target rows 0.

    ``0.5 * (mean over source rows + mean over target rows)``, each mean weighted
    by ``weights`` when given (CDAN+E's :func:`entropy_weights`), so the two
    domains count equally whatever their share of the batch.
    """
    logits = jnp.asarray(domain_logits, jnp.float32).reshape(-1)
    is_source = (jnp.asarray(domain).reshape(-1) == SOURCE).astype(jnp.float32)
    # log(1 + exp(-z)) for source rows, log(1 + exp(z)) for target rows
    losses = jax.nn.softplus(jnp.where(is_source > 0, -logits, logits))
    w = jnp.ones_like(logits) if weights is None else jnp.asarray(weights, jnp.float32).reshape(-1)
    if mask is not None:
        w = w * jnp.asarray(mask, jnp.float32).reshape(-1)
    return 0.5 * (_mean_over(losses, w * is_source) + _mean_over(losses, w * (1 - is_source)))


def multilinear_map(features, probs):
    """CDAN's conditioning: the outer product ``f g^T`` of each row, flattened ``[B, D * C]``."""
    return (features[:, :, None] * probs[:, None, :]).reshape(features.shape[0], -1)


def randomized_multilinear_map(features, probs, rf, rg):
    """CDAN's map for large ``D * C``: ``(f R_f) * (g R_g) / sqrt(out)`` with fixed random
    ``R_f`` ``[D, out]`` and ``R_g`` ``[C, out]``; its inner products approximate those
    of :func:`multilinear_map` in expectation."""
    return (features @ rf) * (probs @ rg) / jnp.sqrt(jnp.float32(rf.shape[1]))


def entropy(probs, axis: int = -1):
    """Shannon entropy (nats) of each distribution along ``axis``."""
    p = jnp.asarray(probs, jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def entropy_weights(probs):
    """CDAN+E's ``1 + exp(-H(g))``: confident predictions weigh more (no gradient)."""
    return jax.lax.stop_gradient(1.0 + jnp.exp(-entropy(probs)))


# ------------------------------------------------------- statistic matching
def _covariance(x, w):
    """Unbiased weighted covariance ``[D, D]`` of the rows of ``x`` with 0/1 weights ``w``."""
    n = jnp.sum(w)
    mean = jnp.sum(x * w, 0) / jnp.maximum(n, 1.0)
    centred = (x - mean) * w
    return centred.T @ centred / jnp.maximum(n - 1.0, 1.0)


def coral(features, domain, *, mask=None):
    """Deep CORAL: ``|C_s - C_t|_F^2 / (4 D^2)`` of the source and target feature
    covariances (unbiased). 0 when both domains' rows have the same covariance."""
    f = jnp.asarray(features, jnp.float32)
    d = f.shape[-1]
    diff = _covariance(f, _rows(domain, mask, SOURCE, f)) - _covariance(f, _rows(domain, mask, TARGET, f))
    return jnp.sum(diff ** 2) / (4.0 * d * d)


def mk_mmd(features, domain, *, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0), mask=None):
    """Multi-kernel MMD^2 (biased estimate) between source and target features.

    ``k(x, y) = sum_a exp(-|x - y|^2 / (2 a m))`` with ``m`` the batch's mean
    squared pairwise distance (no gradient), as in DAN:
    ``MMD^2 = E_ss k + E_tt k - 2 E_st k`` over the source (s) and target (t) rows.
    """
    f = jnp.asarray(features, jnp.float32)
    ws = _rows(domain, mask, SOURCE, f)[:, 0]
    wt = _rows(domain, mask, TARGET, f)[:, 0]
    sq = jnp.sum(f ** 2, 1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0)
    used = (ws + wt)[:, None] * (ws + wt)[None, :]
    m = jax.lax.stop_gradient(jnp.sum(dist * used) / jnp.maximum(jnp.sum(used), 1.0))
    kernel = sum(jnp.exp(-dist / (2.0 * a * jnp.maximum(m, 1e-12))) for a in alphas)

    def mean_k(a, b):
        pair = a[:, None] * b[None, :]
        return jnp.sum(kernel * pair) / jnp.maximum(jnp.sum(pair), 1.0)

    return mean_k(ws, ws) + mean_k(wt, wt) - 2.0 * mean_k(ws, wt)


def mcc(logits, domain=None, *, temperature: float = 2.5, mask=None):
    """Minimum class confusion on the target rows' predictions.

    With ``Y = softmax(logits / T)`` ``[B, C]`` and example weights
    ``w = B (1 + exp(-H(Y))) / sum(1 + exp(-H(Y)))``, the class confusion is
    ``C = Y^T diag(w) Y``, each row normalised to sum 1; the loss is the mean
    off-diagonal mass per class, ``(sum(C) - tr(C)) / num_classes``. 0 when
    every prediction is one-hot.
    """
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    rows = (jnp.ones(probs.shape[:1]) if domain is None else
            (jnp.asarray(domain).reshape(-1) == TARGET).astype(jnp.float32))
    if mask is not None:
        rows = rows * jnp.asarray(mask, jnp.float32).reshape(-1)
    w = entropy_weights(probs) * rows
    w = w * jnp.sum(rows) / jnp.maximum(jnp.sum(w), 1e-12)
    confusion = (probs * w[:, None]).T @ probs
    confusion = confusion / jnp.maximum(confusion.sum(1, keepdims=True), 1e-12)
    num_classes = probs.shape[-1]
    return (jnp.sum(confusion) - jnp.trace(confusion)) / num_classes


# ------------------------------------------------------------------- AdaBN
@contextlib.contextmanager
def _batch_statistics_scope():
    """Every ``nn.BatchNorm`` normalises with batch statistics and stores them whole
    (momentum 0), so its new running statistics are exactly the batch's; every
    ``nn.Dropout`` (stochastic depth included: ``models.common.DropPath`` is one) is
    the identity, so the statistics are those of the network as it is tested."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.Dropout):
            return step_lib.call_with_flag(module, args, kwargs, next_fun, "deterministic", True, 1)
        if not isinstance(module, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        old = module.momentum, module.use_running_average
        object.__setattr__(module, "momentum", 0.0)
        if module.use_running_average is not None:
            object.__setattr__(module, "use_running_average", False)
        else:
            args, kwargs = args[:1], {**kwargs, "use_running_average": False}
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "momentum", old[0])
            object.__setattr__(module, "use_running_average", old[1])

    with nn.intercept_methods(interceptor):
        yield


def adabn(apply_fn, variables: dict[str, Any], batches: Iterable[dict]) -> dict[str, Any]:
    """AdaBN: batch-norm statistics re-estimated on (unlabelled) target ``batches``.

    Runs ``apply_fn(variables, batch, train=True)`` on each batch with every
    batch norm normalising by its batch's statistics, and returns the model
    state (``{"batch_stats": ...}``) whose running means and variances are the
    averages of the per-batch means and variances, each batch weighted by its
    rows (PyTorch's ``momentum=None`` cumulative average; as there, a variance is
    the mean of the batch variances). Batches should hold no padding rows:
    batch norm does not read masks. Dropout is off (every ``nn.Dropout``, stochastic
    depth included); a fixed rng is passed for anything else that draws one.

    ``apply_fn`` is the step's ``(variables, batch, *, train, rng) -> (outputs, state)``.
    """

    @jax.jit
    def stats(variables, batch):
        with _batch_statistics_scope():
            _, new_state = apply_fn(variables, batch, train=True, rng=jax.random.key(0))
        return new_state

    total, count = None, 0.0
    for batch in batches:
        rows = float(len(next(iter(jax.tree_util.tree_leaves(batch)))))
        new = stats(variables, batch)
        new = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64) * rows, jax.device_get(new))
        total = new if total is None else jax.tree_util.tree_map(np.add, total, new)
        count += rows
    if total is None:
        raise ValueError("adabn got no batches")
    old = {k: v for k, v in variables.items() if k != "params"}
    return jax.tree_util.tree_map(lambda t, o: jnp.asarray(t / count, jnp.asarray(o).dtype), total,
                                  {k: old[k] for k in total})

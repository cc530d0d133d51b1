"""Transferability scores: known answers and an independent numpy LogME."""

import numpy as np
import pytest

from jaxfer.transfer import select

RNG = np.random.default_rng(0)


def _clustered(n=120, d=6, c=3, spread=0.6, rng=RNG):
    labels = rng.integers(0, c, size=n)
    centres = rng.normal(size=(c, d)) * 2
    return (centres[labels] + spread * rng.normal(size=(n, d))).astype(np.float32), labels


def _numpy_logme(f, labels, tol):
    """LogME as in the paper, in float64 with the D x D eigendecomposition (not an SVD of F)."""
    f = np.asarray(f, np.float64)
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0, None)
    scores = []
    for k in range(labels.max() + 1):
        y = (labels == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        while True:
            a_inv = v @ np.diag(1.0 / (alpha + beta * s)) @ v.T   # (alpha I + beta F^T F)^-1
            m = beta * a_inv @ f.T @ y
            gamma = np.sum(beta * s / (alpha + beta * s))
            new_alpha = gamma / (m @ m)
            new_beta = (n - gamma) / np.sum((y - f @ m) ** 2)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) <= tol
            alpha, beta = new_alpha, new_beta
            if done:
                break
        a_inv = v @ np.diag(1.0 / (alpha + beta * s)) @ v.T
        m = beta * a_inv @ f.T @ y
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                    - beta / 2 * np.sum((y - f @ m) ** 2) - alpha / 2 * (m @ m) - n / 2 * np.log(2 * np.pi))
        scores.append(evidence / n)
    return float(np.mean(scores))


@pytest.mark.parametrize("n,d", [(120, 6), (50, 40)])
def test_logme_matches_numpy(n, d):
    f, y = _clustered(n=n, d=d)
    ours = float(select.logme(f, y, tol=1e-7, max_iter=500))
    np.testing.assert_allclose(ours, _numpy_logme(f, y, tol=1e-7), atol=1e-4)


def test_logme_scores_informative_features_above_noise():
    f, y = _clustered()
    noise = RNG.normal(size=f.shape).astype(np.float32)
    assert float(select.logme(f, y)) > float(select.logme(noise, y)) + 0.05


def test_nce_of_a_deterministic_mapping_is_zero():
    z = RNG.integers(0, 6, size=200)
    assert abs(float(select.nce(z, z % 3))) < 1e-6
    assert float(select.nce(z, RNG.integers(0, 3, size=200))) < -0.5  # independent labels


def test_leep_of_confident_correct_predictions_approaches_zero():
    y = RNG.integers(0, 4, size=100)
    one_hot = np.eye(4)[y]

    def leep_at(confidence):
        logits = confidence * one_hot
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return float(select.leep(probs, y))

    values = [leep_at(c) for c in (1.0, 4.0, 30.0)]
    assert values[0] < values[1] < values[2] and abs(values[2]) < 1e-6


def test_h_score_is_invariant_to_an_invertible_linear_map():
    f, y = _clustered()
    a = np.eye(6) + 0.3 * RNG.normal(size=(6, 6))
    mapped = (f @ a + RNG.normal(size=6)).astype(np.float32)
    h, h_mapped = float(select.h_score(f, y)), float(select.h_score(mapped, y))
    np.testing.assert_allclose(h, h_mapped, rtol=1e-3)
    assert h > float(select.h_score(RNG.normal(size=f.shape).astype(np.float32), y)) + 0.5


def test_shrinkage_matches_sklearn_and_its_h_score_stays_finite_when_d_exceeds_n():
    from sklearn.covariance import ledoit_wolf_shrinkage

    f, y = _clustered(n=30, d=50)
    np.testing.assert_allclose(float(select.ledoit_wolf_shrinkage(f)),
                               ledoit_wolf_shrinkage(f.astype(np.float64)), rtol=1e-4)
    h = float(select.shrinkage_h_score(f, y))
    assert np.isfinite(h) and h > float(select.shrinkage_h_score(RNG.normal(size=f.shape), y))


def test_transrate_matches_its_formula_and_prefers_informative_features():
    f, y = _clustered()

    def rate(z, scale):
        return 0.5 * np.linalg.slogdet(np.eye(z.shape[1]) + scale * z.T @ z)[1]

    z = f.astype(np.float64) - f.mean(0)
    n, d = z.shape
    ref = rate(z, d / n) - sum((y == k).mean() * rate(z[y == k], d / (y == k).sum()) for k in range(3))
    np.testing.assert_allclose(float(select.transrate(f, y)), ref, rtol=1e-4)
    assert float(select.transrate(f, y)) > float(select.transrate(RNG.normal(size=f.shape), y))

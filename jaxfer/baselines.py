"""Baselines without transfer, fitted on a recipe's own split, to print beside its test metrics.

Transfer learning can hurt: a pretrained start that does not suit the data can
end below a model that never saw anything else (negative transfer). Every
training report therefore shows, next to the majority-class baseline
(:func:`jaxfer.metrics.majority_baseline`), a simple model fitted from nothing
on the same training split and tested on the same test split:

* text: TF-IDF of word 1-2-grams + multinomial logistic regression (scikit-learn);
  for a multitask recipe, one per task (:func:`task_baselines`; ridge regression
  for a regression task);
* images: logistic regression on the pixels, downsampled to ``size x size``
  greyscale and standardised;
* anything else (or without scikit-learn): skipped, with the reason.

:func:`verdict` says, in words, whether the model beat it, and what to try
when it did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer import metrics

MAX_TRAIN = 20_000  # examples the baseline is fitted on at most (a seeded subset beyond)


def _subset(n: int, limit: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit]) if n > limit else np.arange(n)


def _tfidf(train_texts: Sequence[str], test_texts: Sequence[str], seed: int):
    """``(keep, x, x_test)``: the text baselines' features -- TF-IDF of word 1-2-grams
    (sublinear tf, min_df 2) fitted on the train rows ``keep`` (a seeded subset past
    ``MAX_TRAIN``), for those rows and for every test text."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    keep = _subset(len(train_texts), MAX_TRAIN, seed)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vectorizer.fit_transform([str(train_texts[i]) for i in keep])
    return keep, x, vectorizer.transform([str(t) for t in test_texts])


def _sklearn_missing() -> dict[str, Any] | None:
    """A skipped baseline when scikit-learn is not installed, else ``None``."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return skipped("scikit-learn is not installed (pip install scikit-learn)")
    return None


def text_baseline(train_texts: Sequence[str], train_labels, test_texts: Sequence[str], test_labels, *,
                  num_classes: int, label_names: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """TF-IDF (word 1-2-grams, sublinear tf, min_df 2) + logistic regression (C = 1)."""
    from sklearn.linear_model import LogisticRegression

    keep, x, x_test = _tfidf(train_texts, test_texts, seed)
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x, np.asarray(train_labels)[keep])
    preds = model.predict(x_test)
    report = metrics.classification_report(test_labels, preds, label_names, num_classes=num_classes)
    report["name"] = "TF-IDF + logistic regression"
    return report


def text_regression_baseline(train_texts: Sequence[str], train_targets, test_texts: Sequence[str], test_targets,
                             *, seed: int = 0) -> dict[str, Any]:
    """TF-IDF (as :func:`text_baseline`) + ridge regression (alpha 1): ``mse``, ``rmse``, ``mae``, ``r2``."""
    from sklearn.linear_model import Ridge

    keep, x, x_test = _tfidf(train_texts, test_texts, seed)
    model = Ridge(alpha=1.0).fit(x, np.asarray(train_targets, np.float64)[keep])
    preds = model.predict(x_test)
    report = metrics.regression_report(np.asarray(test_targets, np.float64), preds)
    report["name"] = "TF-IDF + ridge regression"
    return report


def task_baselines(tasks: Sequence[Any], train_source, test_source, *, text: str = "text",
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """A multitask recipe's baselines: for each task (:class:`jaxfer.tasks.Task`), the text
    baseline fitted on its own labels (its column ``task.label``; rows without one, ``-100``
    or NaN, left out of both fit and test): TF-IDF + logistic regression for a
    classification task, TF-IDF + ridge regression for a regression task, else skipped."""
    if missing := _sklearn_missing():
        return {t.name: missing for t in tasks}
    cols, test_cols = getattr(train_source, "columns", None), getattr(test_source, "columns", None)
    out = {}
    for t in tasks:
        if cols is None or test_cols is None or text not in cols or t.label not in cols or t.label not in test_cols:
            out[t.name] = skipped(f"the text source has no in-memory {text!r} and {t.label!r} columns")
            continue
        y, y_test = np.asarray(cols[t.label]), np.asarray(test_cols[t.label])
        if t.kind == "classification":
            have, have_test = y >= 0, y_test >= 0
        elif t.kind == "regression":
            have, have_test = np.isfinite(y), np.isfinite(y_test)
        else:
            out[t.name] = skipped(f"no simple baseline for a {t.kind!r} task")
            continue
        if have.sum() < 2 or not have_test.any():
            out[t.name] = skipped("too few labelled rows")
            continue
        x, x_test = np.asarray(cols[text], object)[have], np.asarray(test_cols[text], object)[have_test]
        if t.kind == "classification":
            out[t.name] = text_baseline(x, y[have], x_test, y_test[have_test], num_classes=t.num_classes,
                                        label_names=t.label_names, seed=seed)
        else:
            out[t.name] = text_regression_baseline(x, y[have], x_test, y_test[have_test], seed=seed)
    return out


def pixels(source, size: int = 32, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, size*size], labels [N])``: each ``source[i]["image"]`` to greyscale,
    resized to ``size x size`` (PIL bilinear), in [0, 1]."""
    from PIL import Image

    idx = _subset(len(source), limit, seed) if limit else np.arange(len(source))
    feats, labels = [], []
    for i in idx:
        ex = source[int(i)]
        im = Image.fromarray(np.asarray(ex["image"], np.uint8).squeeze()).convert("L")
        feats.append(np.asarray(im.resize((size, size), Image.BILINEAR), np.float32).ravel() / 255.0)
        labels.append(int(ex["label"]))
    return np.stack(feats), np.asarray(labels)


def image_baseline(train_source, test_source, *, num_classes: int, label_names: Sequence[str] | None = None,
                   size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on standardised ``size x size`` greyscale pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = pixels(train_source, size, MAX_TRAIN, seed)
    x_test, y_test = pixels(test_source, size)
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(x), y)
    report = metrics.classification_report(y_test, model.predict(scaler.transform(x_test)), label_names,
                                           num_classes=num_classes)
    report["name"] = f"logistic regression on {size}x{size} pixels"
    return report


def skipped(why: str) -> dict[str, Any]:
    return {"skipped": why}


def non_transfer(kind: str, train_source, test_source, *, num_classes: int, text: str = "text",
                 label_names: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """The baseline for a recipe's input ``kind`` (``"text"`` or ``"image"``), or why there is none."""
    if missing := _sklearn_missing():
        return missing
    if kind == "text":
        cols = getattr(train_source, "columns", None)
        test_cols = getattr(test_source, "columns", None)
        if cols is None or test_cols is None or text not in cols or "label" not in cols:
            return skipped(f"the text source has no in-memory {text!r} and 'label' columns")
        return text_baseline(cols[text], cols["label"], test_cols[text], test_cols["label"],
                             num_classes=num_classes, label_names=label_names, seed=seed)
    if kind == "image":
        try:
            first = train_source[0]
        except Exception as e:  # noqa: BLE001 -- a source without random access: say so, never fail the run
            return skipped(f"the image source cannot be read by index ({type(e).__name__})")
        if "image" not in first or "label" not in first:
            return skipped("the image source has no 'image' and 'label' fields")
        return image_baseline(train_source, test_source, num_classes=num_classes, label_names=label_names,
                              seed=seed)
    return skipped(f"no simple baseline for {kind!r} inputs")


def verdict(model: dict[str, Any], baseline: dict[str, Any], *, what: str = "the model") -> str | None:
    """One plain sentence when ``model`` does not beat ``baseline`` (else ``None``), with what
    to try: on macro-F1 for classification, on R^2 for regression."""
    if "skipped" in baseline:
        return None
    if "macro_f1" in model and "macro_f1" in baseline:
        if model["macro_f1"] > baseline["macro_f1"]:
            return None
        numbers = (f"macro-F1 {model['macro_f1']:.4f} vs {baseline['macro_f1']:.4f}; accuracy "
                   f"{model['accuracy']:.4f} vs {baseline['accuracy']:.4f}")
    elif "r2" in model and "r2" in baseline:
        if model["r2"] > baseline["r2"]:
            return None
        numbers = f"R^2 {model['r2']:.4f} vs {baseline['r2']:.4f}; RMSE {model['rmse']:.4f} vs {baseline['rmse']:.4f}"
    else:
        return None
    return (f"WARNING: {what} does not beat the {baseline['name']} baseline trained from nothing on the "
            f"same split ({numbers}): the pretrained start is not helping "
            f"(negative transfer, or too little training). Try: more steps or more trainable layers "
            f"(the recipe's :full variant), a lower learning rate, the :scratch variant to see what "
            f"pretraining is worth here, or another pretrained model (jaxfer rank --candidates ...).")

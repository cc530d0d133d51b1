"""``jaxfer rank``: score candidate pretrained models for a recipe before training them.

For each candidate, the recipe's head-input features (what its ``Classifier``
pools from the backbone) are computed once over a seeded subset of the recipe's
*training* split (cached on disk by :func:`jaxfer.transfer.features.cached`,
keyed by the candidate's weights and the data), and scored with
:mod:`jaxfer.transfer.select` (LogME, H-score, shrinkage H-score, TransRate;
higher = better transfer). With ``finetune_steps`` each candidate is also
fine-tuned by the recipe (its rules, optimizer and data) for that many steps,
its accuracy taken on the validation split (never the test split), and the
Spearman correlation of each score with those accuracies is reported.

A candidate is a string:

* ``SRC`` -- pretrained weights (a folder or hub id; ``recipe`` = the recipe's
  ``model.source``);
* ``SRC:scratch`` -- the same architecture, randomly initialised;
* ``SRC:layers=K`` -- the pretrained model truncated to its first ``K`` layers
  (families whose config has ``num_hidden_layers``: BERT, RoBERTa, ViT).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxfer.transfer import features as features_lib
from jaxfer.transfer import select

SCORES = ("logme", "h_score", "shrinkage_h_score", "transrate")


@dataclasses.dataclass(frozen=True)
class Candidate:
    spec: str
    source: str
    scratch: bool = False
    layers: int | None = None


def parse(spec: str, recipe_source: str) -> Candidate:
    """``SRC``, ``SRC:scratch`` or ``SRC:layers=K`` (``recipe`` stands for the recipe's source)."""
    source, scratch, layers = spec, False, None
    head, _, tail = spec.rpartition(":")
    if head and tail == "scratch":
        source, scratch = head, True
    elif head and tail.startswith("layers="):
        source = head
        try:
            layers = int(tail[len("layers="):])
        except ValueError:
            raise ValueError(f"candidate {spec!r}: layers=K needs an integer K") from None
        if layers < 1:
            raise ValueError(f"candidate {spec!r}: keep at least one layer")
    if source == "recipe":
        source = recipe_source
    return Candidate(spec, source, scratch, layers)


def _truncated(config: Any, layers: int) -> Any:
    config = copy.deepcopy(config)
    total = config["num_hidden_layers"] if isinstance(config, dict) else getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ValueError("truncating needs a model whose config has num_hidden_layers (BERT, RoBERTa, ViT)")
    if layers > int(total):
        raise ValueError(f"cannot keep {layers} layers of a {total}-layer model")
    if isinstance(config, dict):
        config["num_hidden_layers"] = layers
    else:
        config.num_hidden_layers = layers
    return config, int(total)


def load(cand: Candidate, head, *, rng: int = 0, place=None):
    """The candidate as a :class:`jaxfer.Model` with ``head`` (a new head, initialised)."""
    from jaxfer.weights import sources
    from jaxfer.weights.load import load as load_weights

    kw: dict[str, Any] = {"rng": rng, "place": place}
    if cand.scratch:
        kw["reinit"] = ("**",)
    if cand.layers is not None:
        config, total = _truncated(sources.read_config(sources.resolve(cand.source)), cand.layers)
        kw["config"] = config
        if cand.layers < total:  # the checkpoint's deeper layers are left out, by name
            kw["ignore"] = tuple(f"re:(.*/)?layer/{i}/.*" for i in range(cand.layers, total))
    return load_weights(cand.source, head=head, **kw)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN for fewer than 2 values
    or a constant input."""
    def ranks(x):
        x = np.asarray(x, np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # average ranks of ties
            r[x == v] = r[x == v].mean()
        return r

    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores for {len(b)} accuracies")
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def scores(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Every score of :data:`SCORES`; features are first scaled to unit mean squared norm
    (scores but TransRate are scale invariant; TransRate's ``eps`` is then comparable)."""
    f = np.asarray(features, np.float32).reshape(len(features), -1)
    f = f / np.sqrt(np.mean(np.sum((f - f.mean(0)) ** 2, 1)) + 1e-12)
    fns = {"logme": select.logme, "h_score": select.h_score,
           "shrinkage_h_score": select.shrinkage_h_score, "transrate": select.transrate}
    return {name: float(fns[name](f, labels, num_classes)) for name in SCORES}


# -------------------------------------------------------------- the command
def _feature_data(cfg, model, max_examples: int):
    """Padded evaluation batches over a seeded subset of the training split, and its labels."""
    from jaxfer import data as data_lib, experiment

    train_src = experiment._sources(cfg)[0]
    if max_examples and len(train_src) > max_examples:
        keep = np.random.default_rng(cfg.seed).permutation(len(train_src))[:max_examples]
        train_src = train_src.select(np.sort(keep))
    batches = data_lib.make_pipeline(train_src, global_batch_size=cfg.data.eval_batch_size, train=False,
                                     **experiment._preprocessing(cfg, model))
    return batches, train_src


def extract(cfg, cand: Candidate, *, max_examples: int, cache_dir: str | None) -> dict[str, Any]:
    """Load the candidate, compute (or read back) its features; scores and seconds."""
    from jaxfer import experiment

    t0 = time.perf_counter()
    model = load(cand, experiment.head_for(cfg), rng=cfg.seed)
    batches, src = _feature_data(cfg, model, max_examples)
    labels_by_id = dict(zip(np.asarray(src.columns["id"] if hasattr(src, "columns") else src.ids).tolist(),
                            np.asarray(experiment._labels(src)).tolist()))
    fn = features_lib.head_input_fn(model.module)
    key = features_lib.fingerprint(cand.spec, model.params, features_lib.source_fingerprint(batches))
    feats = features_lib.cached(fn, model.variables, batches, directory=cache_dir, key=key)
    x = feats.array()
    y = np.asarray([labels_by_id[int(i)] for i in feats.ids])
    t1 = time.perf_counter()
    row = {"candidate": cand.spec, "examples": len(y), "dim": int(x.shape[-1]), "cached": feats.reused,
           **scores(x, y, cfg.model.num_classes)}
    row["seconds"] = time.perf_counter() - t0
    row["score_seconds"] = time.perf_counter() - t1
    return row


def finetune(cfg, cand: Candidate, steps: int, *, progress: bool = False) -> dict[str, Any]:
    """The recipe, started from the candidate, for ``steps`` steps (warm-up shortened to a
    tenth when it is longer): validation metrics."""
    from jaxfer import experiment, objective
    from jaxfer.train import loop, step as step_lib
    from jaxfer.train.state import TrainState

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        cfg.train.steps = steps
        if cfg.optim.get("warmup_steps", 0) >= steps:  # a brief run: warm up over a tenth of it
            cfg.optim.warmup_steps = steps // 10
    t0 = time.perf_counter()
    model = load(cand, experiment.head_for(cfg), rng=cfg.seed)
    trainable = experiment.trainable_mask(cfg, model.params)
    tx, schedule = experiment.build_optimizer(cfg, model)
    data = experiment.build_data(cfg, model)
    loss_fn, eval_loss_fn = objective.loss_fns(cfg)
    apply_fn = step_lib.model_apply(model)
    train_step = step_lib.make_train_step(apply_fn, loss_fn, tx, trainable,
                                          micro_batches=cfg.optim.get("accumulate", 1) or 1,
                                          lr_schedule=schedule)
    eval_step = step_lib.make_eval_step(apply_fn, eval_loss_fn)
    state = TrainState.create(model.params, tx, rng=jax.random.key(cfg.seed), model_state=model.state,
                              copy=False)
    state, _ = loop.fit(state, train_step, data.train, steps=steps, log_every=max(steps, 1),
                        progress=progress)
    report = loop.evaluate(state, eval_step, data.validation, task=cfg.task, label_names=data.label_names)
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
            "finetune_seconds": time.perf_counter() - t0}


def rank(cfg, specs: Sequence[str], *, finetune_steps: int = 0, max_examples: int = 2000,
         cache_dir: str | None = None, log=print) -> dict[str, Any]:
    """Score every candidate (and fine-tune it when ``finetune_steps``); the table's rows,
    and Spearman correlations of each score with the fine-tuned accuracy."""
    if cfg.task != "classification" or cfg.get("multitask"):
        raise ValueError("jaxfer rank scores single-task classification recipes")
    cands = [parse(s, cfg.model.source) for s in specs]
    if len({c.spec for c in cands}) != len(cands):
        raise ValueError(f"candidates repeat: {list(specs)}")
    rows = []
    for cand in cands:
        row = extract(cfg, cand, max_examples=max_examples, cache_dir=cache_dir)
        log(f"{cand.spec}: " + "  ".join(f"{k} {row[k]:.4g}" for k in SCORES)
            + f"  ({row['seconds']:.1f} s{', cached features' if row['cached'] else ''})")
        if finetune_steps:
            row.update(finetune(cfg, cand, finetune_steps))
            log(f"{cand.spec}: fine-tuned {finetune_steps} steps: validation accuracy {row['accuracy']:.4f}")
        rows.append(row)
    result: dict[str, Any] = {"rows": rows}
    if finetune_steps:
        acc = [r["accuracy"] for r in rows]
        result["spearman"] = {k: spearman([r[k] for r in rows], acc) for k in SCORES}
    return result


def format_table(result: dict[str, Any], finetune_steps: int = 0) -> str:
    rows = result["rows"]
    width = max(9, *(len(r["candidate"]) for r in rows))
    cols = [("logme", "LogME"), ("h_score", "H-score"), ("shrinkage_h_score", "shrink-H"),
            ("transrate", "TransRate")]
    head = f"{'candidate':<{width}} " + " ".join(f"{t:>10}" for _, t in cols) + f" {'seconds':>8}"
    if finetune_steps:
        head += f" {'fine-tuned acc':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['candidate']:<{width}} " + " ".join(f"{r[k]:>10.4f}" for k, _ in cols)
        line += f" {r['seconds']:>8.1f}"
        if finetune_steps:
            line += f" {r['accuracy']:>15.4f}"
        lines.append(line)
    if "spearman" in result:
        lines.append(f"{'Spearman':<{width}} " + " ".join(
            f"{result['spearman'][k]:>10.3f}" for k, _ in cols)
            + f"   (rank correlation with the accuracy after {finetune_steps} fine-tuning steps)")
    lines.append(f"seconds: loading + features ({rows[0]['examples']} training examples"
                 f"{', read from the cache where cached' if any(r['cached'] for r in rows) else ''}) + scores")
    return "\n".join(lines)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxfer", "rank")

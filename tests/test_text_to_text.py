"""The T5 and GPT-2 recipes through the CLI at their tiny sizes, trained from scratch on the
stand-in tweets: generated label words score like the same model's classifier head."""

import json
import os

import pytest

from jaxfer import cli
from tests import stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.steps=150", "--config.train.eval_every=150", "--config.train.checkpoint_every=150",
        "--config.train.log_every=50", "--config.optim.warmup_steps=10", "--config.data.batch_size=16",
        "--config.data.eval_batch_size=30", "--no_progress"]


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2t")
    csv = stand_ins.tweets_csv(str(d / "tweets.csv"), n=600)
    with open(csv) as f:
        texts = [line.split(",", 2)[2] for line in f.readlines()[1:]]
    tok = stand_ins.word_tokenizer(str(d / "tokenizer"), texts)
    # the recipes' own models, on the word tokenizer's vocabulary ([PAD] 0, [SEP] 2)
    vocab = ["--config.model.scratch.vocab_size=700", f"--config.model.tokenizer={tok}",
             "--config.model.scratch.eos_token_id=2"]
    return csv, vocab


def _args(recipe, tweets, workdir):
    csv, vocab = tweets
    extra = vocab + (["--config.model.scratch.bos_token_id=2"] if recipe.startswith("gpt2") else [])
    return ["--config", os.path.join(ROOT, "configs", recipe), f"--config.data.path={csv}", *extra,
            "--workdir", str(workdir)]


def _train(recipe, tweets, workdir, *extra):
    assert cli.main(["train", *_args(recipe, tweets, workdir), *FAST, *extra]) == 0
    return json.load(open(os.path.join(workdir, "test_metrics.json")))


def test_t5_label_words_score_like_the_classifier_head(tweets, tmp_path, capsys):
    t2t = _train("t5_tweets.py:tiny", tweets, tmp_path / "t2t")
    clf = _train("t5_tweets.py:tiny_classifier", tweets, tmp_path / "clf")
    a, b = t2t["test"]["accuracy"], clf["test"]["accuracy"]
    print(f"T5 tiny: text-to-text {a:.3f} vs classifier head {b:.3f} (majority {t2t['majority_baseline']['accuracy']:.3f})")
    assert t2t["test"]["num_examples"] == clf["test"]["num_examples"] == 60  # the same split
    assert a >= 0.9 and b >= 0.9 and abs(a - b) <= 0.1
    assert t2t["test"]["other_rate"] < 0.1 and t2t["test"]["perplexity"] < 2
    capsys.readouterr()
    args = _args("t5_tweets.py:tiny", tweets, tmp_path / "t2t")
    assert cli.main(["eval", *args]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(a)
    assert cli.main(["predict", *args, "--text", t2t_text(tweets)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["label"] in ("negative", "neutral", "positive") and row["generated"] == row["label"]


def t2t_text(tweets) -> str:
    with open(tweets[0]) as f:
        return f.readlines()[1].split(",", 2)[2].strip()


def test_gpt2_text_to_text_and_language_model(tweets, tmp_path):
    t2t = _train("gpt2_tweets.py:tiny", tweets, tmp_path / "t2t")
    assert t2t["test"]["accuracy"] >= 0.9 and t2t["test"]["exact_match"] == t2t["test"]["accuracy"]
    # causal LM of the tweets themselves (the small size shrunk): perplexity, no generation
    lm = _train("gpt2_tweets.py:lm", tweets, tmp_path / "lm", "--config.train.steps=20",
                "--config.train.eval_every=20", "--config.model.scratch.n_embd=16", "--config.model.scratch.n_layer=1")
    assert set(lm["test"]) >= {"perplexity", "token_accuracy", "loss"} and "accuracy" not in lm["test"]
    assert 1 < lm["test"]["perplexity"] < 30522 and "majority_baseline" not in lm


def test_readme_generation_example_runs(tmp_path):
    """The README's generation block, on a tiny GPT-2 (with a word tokenizer) for the hub's."""
    import re

    import torch
    import transformers

    path = stand_ins.word_tokenizer(str(tmp_path / "gpt2"), ["the weather today", "my favourite film"])
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                     bos_token_id=2, eos_token_id=2, pad_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    readme = open(os.path.join(ROOT, "README.md")).read()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "generate(" in b]
    namespace: dict = {}
    exec(compile(block.replace('"openai-community/gpt2"', repr(path)), "README.md", "exec"), namespace)
    assert namespace["greedy"]["tokens"].shape == namespace["beams"]["tokens"].shape == (2, 20)

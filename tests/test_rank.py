"""jaxfer rank: candidates (pretrained, scratch, truncated), cached features, scores, Spearman."""

import json
import os

import numpy as np
import pytest

from jaxfer import cli
from jaxfer.transfer import rank
from tests import stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_candidate_strings_and_spearman():
    assert rank.parse("recipe", "/m") == rank.Candidate("recipe", "/m")
    assert rank.parse("/m:scratch", "x") == rank.Candidate("/m:scratch", "/m", scratch=True)
    assert rank.parse("org/model:layers=2", "x") == rank.Candidate("org/model:layers=2", "org/model", layers=2)
    with pytest.raises(ValueError, match="integer"):
        rank.parse("m:layers=two", "x")
    assert rank.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])


def test_rank_command_scores_finetunes_and_reuses_cached_features(tmp_path, capsys):
    bert = stand_ins.tiny_bert(str(tmp_path / "bert"))
    csv = stand_ins.tweets_csv(str(tmp_path / "tweets.csv"))
    args = ["rank", "--config", os.path.join(ROOT, "configs", "minilm_tweets.py:full"),
            f"--config.model.source={bert}", f"--config.data.path={csv}", "--config.data.batch_size=8",
            "--config.data.eval_batch_size=32", "--workdir", str(tmp_path / "rank"),
            "--candidates", "recipe", "recipe:scratch", "recipe:layers=2"]
    assert cli.main([*args, "--finetune-steps", "2", "--config.optim.warmup_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "recipe:layers=2" in out and "fine-tuned acc" in out
    result = json.load(open(tmp_path / "rank" / "rank.json"))
    rows = {r["candidate"]: r for r in result["rows"]}
    assert rows["recipe"]["examples"] == 154 and rows["recipe"]["dim"] == 16
    assert rows["recipe"]["logme"] != rows["recipe:layers=2"]["logme"] != rows["recipe:scratch"]["logme"]
    assert all(np.isfinite(r[k]) for r in rows.values() for k in rank.SCORES)
    assert set(result["spearman"]) == set(rank.SCORES)
    assert cli.main(args) == 0  # the second time the features come from the cache
    again = {r["candidate"]: r for r in json.load(open(tmp_path / "rank" / "rank.json"))["rows"]}
    assert all(r["cached"] for r in again.values())
    assert again["recipe"]["logme"] == pytest.approx(rows["recipe"]["logme"])

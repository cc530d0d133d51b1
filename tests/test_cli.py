"""The command line on bad runs and bad input: one line naming the problem, exit 1
(``--debug`` keeps the traceback); nothing non-finite is saved or predicted."""

import json
import math
import os

import pytest

from jaxfer import cli
from jaxfer.train.checkpoint import Checkpointer
from tests import stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.train.steps=4", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1", "--config.optim.warmup_steps=1", "--no_progress"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    d = tmp_path_factory.mktemp("stand_ins")
    return stand_ins.tiny_bert(str(d / "bert")), stand_ins.tweets_csv(str(d / "tweets.csv"))


def args_for(stand_in, workdir, variant="probe", config=None):
    bert, csv = stand_in
    return ["--config", config or os.path.join(ROOT, "configs", f"minilm_tweets.py:{variant}"),
            f"--config.model.source={bert}", f"--config.data.path={csv}",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
            "--config.data.max_eval_examples=0", "--workdir", str(workdir)]


def exit_message(argv) -> str:
    """Run the CLI, expect a one-line user error (exit 1), return the message."""
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    code = err.value.code
    assert isinstance(code, str), f"expected a message and exit 1, got exit code {code!r}"
    assert "\n" not in code.strip() or code.startswith("jaxfer"), code
    return code


def test_huge_learning_rate_stops_naming_the_step_and_saves_nothing_nonfinite(stand_in, tmp_path):
    run = tmp_path / "run"
    msg = exit_message(["train", *args_for(stand_in, run, "full"), *SHORT,
                        "--config.train.steps=12", "--config.optim.lr=1e6",
                        "--config.optim.clip_norm=0.0", "--config.train.max_nonfinite_skips=1"])
    assert "non-finite" in msg and "step" in msg and "max_nonfinite_skips=1" in msg
    for line in open(run / "metrics.jsonl"):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    assert not (run / "test_metrics.json").exists()

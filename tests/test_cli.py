"""The command line on bad runs and bad input: one line naming the problem, exit 1
(``--debug`` keeps the traceback); nothing non-finite is saved or predicted."""

import json
import math
import os
import socket
import time

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


def test_bad_values_are_all_named_before_the_workdir_is_created(stand_in, tmp_path):
    run = tmp_path / "run"
    msg = exit_message(["train", *args_for(stand_in, run), "--config.train.steps=-5",
                        "--config.data.eval_batch_size=0", "--config.optim.accumulate=3",
                        "--config.model.num_classes=1"])
    for expected in ("ConfigError", "train.steps must be > 0, got -5", "data.eval_batch_size must be > 0",
                     "data.batch_size=8 is not a multiple of optim.accumulate=3",
                     "model.num_classes must be an integer >= 2"):
        assert expected in msg
    assert not run.exists()


def test_inspect_refuses_a_head_without_classes(stand_in, tmp_path):
    msg = exit_message(["inspect", *args_for(stand_in, tmp_path / "run"), "--config.model.num_classes=0"])
    assert "model.num_classes must be an integer >= 2" in msg


def test_data_label_names_that_do_not_fit_the_head_stop_before_training(stand_in, tmp_path):
    run = tmp_path / "run"
    msg = exit_message(["train", *args_for(stand_in, run), "--config.data.label_names=()",
                        "--config.model.num_classes=4"])
    assert "DataError: the data has 3 classes ['negative', 'neutral', 'positive'] but " \
           "model.num_classes=4" in msg
    assert not (run / "checkpoints").exists() or not os.listdir(run / "checkpoints")


@pytest.mark.parametrize("problem", ["model_type", "data_path", "label_column", "data_kind", "workdir_in_use"])
def test_user_errors_end_in_one_message_and_debug_keeps_the_traceback(stand_in, tmp_path, problem):
    from jaxfer.errors import JaxferError

    bert, csv = stand_in
    args = args_for(stand_in, tmp_path / "run")
    if problem == "model_type":
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": "gpt9"}))
        args.append(f"--config.model.source={other}")
        expected = "no jaxfer model family for model_type 'gpt9'"
    elif problem == "data_path":
        args.append(f"--config.data.path={tmp_path / 'nothere.csv'}")
        expected = "nothere.csv' does not exist"
    elif problem == "label_column":
        args.append("--config.data.label=mood")
        expected = "tweets.csv: no column(s) ['mood']; the columns are ['sentiment', 'confidence', 'text']"
    elif problem == "data_kind":
        args.append("--config.data.kind=parquet")
        expected = "unknown data.kind 'parquet'"
    else:  # a live process (this one's parent) holds the workdir
        from jaxfer import workdir as workdir_lib

        (tmp_path / "run").mkdir()
        owner = {"host": socket.gethostname(), "pid": os.getppid(),
                 "start": workdir_lib._process_start(os.getppid()), "heartbeat": time.time()}
        (tmp_path / "run" / workdir_lib.LOCK_FILE).write_text(json.dumps(owner))
        expected = f"pid {os.getppid()}"
    msg = exit_message(["train", *args, *SHORT])
    assert msg.startswith("jaxfer train: ") and expected in msg and "\n" not in msg
    with pytest.raises(JaxferError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        cli.main(["train", *args, *SHORT, "--debug"])


def test_eval_and_predict_rebuild_the_run_from_the_config_it_trained_with(stand_in, tmp_path, capsys):
    run = tmp_path / "run"
    trained_with = ["--config.optim.name=sgd", "--config.optim.weight_decay=0.0",
                    "--config.data.max_length=128"]  # longer than the 64 positions: truncated
    assert cli.main(["train", *args_for(stand_in, run), *SHORT, "--config.train.steps=2",
                     *trained_with]) == 0
    result = json.load(open(run / "test_metrics.json"))
    assert math.isfinite(result["test"]["loss"])
    capsys.readouterr()
    assert cli.main(["eval", *args_for(stand_in, run)]) == 0  # the recipe says adamw
    captured = capsys.readouterr()
    assert json.loads(captured.out)["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert "using the config the run trained with" in captured.err
    assert "data.max_length" in captured.err and "optim.name" in captured.err
    assert cli.main(["predict", "--workdir", str(run), "--text", "I love this"]) == 0  # no --config
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert all(math.isfinite(p) for p in row["probs"].values())

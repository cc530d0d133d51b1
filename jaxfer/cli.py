"""``jaxfer train|eval|predict|inspect|export|serve|rank --config configs/x.py[:arg] [--config.a.b=v ...]``.

Every host of a multi-host run executes the same command. ``jax.distributed``
is initialised when the run spans several processes: detected on TPU pods and
SLURM/Open MPI clusters (JAX's own auto-detection, or ``--distributed``), or
given explicitly with ``--coordinator HOST:PORT --num_processes N
--process_id I``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from jaxfer import config as config_lib

COMMANDS = ("train", "eval", "predict", "inspect", "export", "serve", "rank")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxfer", description="Fine-tune pretrained models in JAX from a recipe file.",
        epilog="Any recipe value can be overridden: --config.optim.lr=3e-5")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", default=None, help="recipe file, optionally with ':arg' (required "
                   "except for `serve --export`)")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, metrics and plots go here; a workdir with a checkpoint is resumed")
    p.add_argument("--text", action="append", default=[], help="(predict) a text to classify; repeatable")
    p.add_argument("--input", action="append", default=[],
                   help="(predict) a CSV/JSONL of texts, or image files / folders / a .txt list; repeatable")
    p.add_argument("--output", default=None,
                   help="(predict) the CSV to write; (export) the folder or .onnx file to write")
    p.add_argument("--format", default="stablehlo", choices=("stablehlo", "onnx", "savedmodel", "hf"),
                   help="(export) a jax.export serving folder, an ONNX file, a TF SavedModel, "
                   "or a Hugging Face folder")
    p.add_argument("--export", default=None, help="(serve) a StableHLO export folder instead of a workdir")
    p.add_argument("--host", default="127.0.0.1", help="(serve) address to listen on")
    p.add_argument("--port", type=int, default=8000, help="(serve) port")
    p.add_argument("--max_batch_size", type=int, default=32, help="(serve) most items in one batch")
    p.add_argument("--max_wait_ms", type=float, default=10.0, help="(serve) longest wait to fill a batch")
    p.add_argument("--candidates", nargs="+", default=None, metavar="SRC",
                   help="(rank) pretrained models to score: a folder or hub id ('recipe': the recipe's), "
                        "SRC:scratch (same architecture, random init), SRC:layers=K (its first K layers)")
    p.add_argument("--finetune-steps", "--finetune_steps", dest="finetune_steps", type=int, default=0,
                   help="(rank) also fine-tune each candidate this many steps and correlate")
    p.add_argument("--max_examples", type=int, default=2000,
                   help="(rank) training examples the features are computed on (a seeded subset)")
    p.add_argument("--split", default="test", choices=("test", "validation"), help="(eval) which split")
    p.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--debug", action="store_true", help="full tracebacks for configuration errors")
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with the cluster's auto-detected settings")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)
    g.add_argument("--local_device_ids", default=None, help="comma-separated device ids of this process")
    return p


def _auto_cluster() -> bool:
    """On a TPU pod slice / SLURM / Open MPI job of several processes."""
    env = os.environ
    if env.get("SLURM_NTASKS", "1") not in ("", "1") and "SLURM_PROCID" in env:
        return True
    if env.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1"):
        return True
    return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))


def init_distributed(args) -> None:
    import jax

    explicit = args.coordinator is not None or args.num_processes is not None
    if explicit:
        missing = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f) is None]
        if missing:
            raise SystemExit(f"jaxfer: multi-host flags need all of --coordinator, --num_processes, "
                             f"--process_id; missing {', '.join('--' + m for m in missing)}")
        ids = ([int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids else None)
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, local_device_ids=ids)
    elif args.distributed or _auto_cluster():
        jax.distributed.initialize()


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time (tests and notebooks
    swap it; the stream of the first call may be closed by the next)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _show_progress_logs() -> None:
    """jaxfer's own INFO messages (resumed from ..., evaluations) on stderr."""
    logger = logging.getLogger("jaxfer")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("jaxfer: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # absl/orbax may give the root logger a handler too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = config_lib.split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == "serve" and args.export:
        return _serve_export(args)
    if not args.config:
        raise SystemExit(f"jaxfer {args.command}: --config is required")
    try:
        cfg = config_lib.load_with_overrides(args.config, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"jaxfer: {e.args[0] if e.args else e}") from None
    init_distributed(args)
    _show_progress_logs()

    from jaxfer.errors import Preempted

    try:
        return _run(args, cfg)
    except Preempted as e:  # saved; the scheduler restarts the same command to resume
        print(f"jaxfer {args.command}: {e}", file=sys.stderr, flush=True)
        return 128 + (e.signum or signal.SIGTERM)
    except _user_errors() as e:  # a bad rule, checkpoint or path: the message says it all
        if args.debug:
            raise
        raise SystemExit(f"jaxfer {args.command}: {type(e).__name__}: {e}") from None


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxfer import masks, tree
    from jaxfer.errors import JaxferError
    from jaxfer.weights import CheckpointError as WeightsError, LoadError
    from jaxfer.weights.save import SaveError

    return (tree.NoMatchError, masks.ShadowedRuleError, masks.UnmatchedPathError, LoadError,
            WeightsError, JaxferError, FileNotFoundError, SaveError)


def _run(args, cfg) -> int:
    from jaxfer import experiment
    from jaxfer.train import checkpoint

    if args.command == "train":
        experiment.train(cfg, args.workdir, progress=not args.no_progress)
    elif args.command == "eval":
        if not args.workdir:
            raise SystemExit("jaxfer eval: --workdir (the run to evaluate) is required")
        result = experiment.evaluate(cfg, args.workdir, args.split)
        print(json.dumps(checkpoint.to_jsonable(result), indent=1))
    elif args.command == "predict" and args.input:
        from jaxfer import deploy, predict_files

        _need_workdir(args)
        if not args.output:
            raise SystemExit("jaxfer predict: --output (the CSV to write) goes with --input")
        predictor = deploy.predictor(deploy.restore(cfg, args.workdir))
        path = predict_files.predict_files(predictor, args.input, args.output, progress=not args.no_progress)
        print(f"wrote {path}")
    elif args.command == "predict":
        if cfg.data.kind not in ("csv", "jsonl"):
            raise SystemExit(f"jaxfer predict classifies --text for text recipes; this recipe reads "
                             f"{cfg.data.kind!r} data: give --input (images) and --output")
        if not args.text:
            raise SystemExit("jaxfer predict: give at least one --text")
        for row in experiment.predict_texts(cfg, args.workdir, args.text):
            print(json.dumps(row))
    elif args.command == "inspect":
        print(experiment.explain(cfg))
    elif args.command == "export":
        from jaxfer import deploy

        _need_workdir(args)
        out = args.output or os.path.join(args.workdir, {"stablehlo": "export", "onnx": "model.onnx",
                                                         "savedmodel": "saved_model", "hf": "hf"}[args.format])
        print(f"wrote {deploy.export(deploy.restore(cfg, args.workdir), out, args.format)}")
    elif args.command == "rank":
        _rank(args, cfg)
    elif args.command == "serve":
        from jaxfer import deploy

        _need_workdir(args)
        _serve(args, deploy.predictor(deploy.restore(cfg, args.workdir), _batch_sizes(args)))
    return 0


def _rank(args, cfg) -> None:
    from jaxfer.train import checkpoint
    from jaxfer.transfer import rank

    if not args.candidates:
        raise SystemExit("jaxfer rank: give --candidates SRC [SRC ...] (e.g. recipe recipe:scratch recipe:layers=2)")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    cache = os.path.join(args.workdir, "features") if args.workdir else rank.default_cache_dir()
    result = rank.rank(cfg, args.candidates, finetune_steps=args.finetune_steps,
                       max_examples=args.max_examples, cache_dir=cache,
                       log=lambda line: print(line, flush=True))
    print(rank.format_table(result, args.finetune_steps))
    if args.workdir:
        with open(os.path.join(args.workdir, "rank.json"), "w") as f:
            json.dump(checkpoint.to_jsonable(result), f, indent=1)


def _need_workdir(args) -> None:
    if not args.workdir:
        raise SystemExit(f"jaxfer {args.command}: --workdir (the trained run) is required")


def _batch_sizes(args) -> tuple[int, ...]:
    """Powers of two up to --max_batch_size: few compiled programs, little padding."""
    sizes = [1]
    while sizes[-1] * 2 < args.max_batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted(set(sizes + [args.max_batch_size])))


def _serve(args, predictor) -> None:
    from jaxfer import serve

    serve.serve(predictor, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                max_wait_ms=args.max_wait_ms)


def _serve_export(args) -> int:
    from jaxfer.inference import Predictor

    if not os.path.isdir(args.export):
        raise SystemExit(f"jaxfer serve: --export {args.export!r} is not a folder")
    _serve(args, Predictor.from_export(args.export, batch_sizes=_batch_sizes(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

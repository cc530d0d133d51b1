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
from jaxfer.errors import ConfigError

COMMANDS = ("train", "eval", "predict", "inspect", "export", "serve", "rank")
RUN_COMMANDS = ("eval", "predict", "export", "serve")  # read a trained run: its saved config wins


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxfer", description="Fine-tune pretrained models in JAX from a recipe file.",
        epilog="Any recipe value can be overridden: --config.optim.lr=3e-5")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", default=None, help="recipe file, optionally with ':arg' (eval, "
                   "predict, export and serve use the config saved in --workdir when there is one)")
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
    p.add_argument("--debug", action="store_true", help="full tracebacks for user errors (bad "
                   "config, data, paths, disks), which otherwise end in one message and exit 1")
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
    from jaxfer.errors import Preempted
    from jaxfer.train.hostmem import reuse_host_memory

    reuse_host_memory()  # before the first jax computation: no page faults on every step

    debug = "--debug" in argv
    try:
        rest, overrides = config_lib.split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.command == "serve" and args.export:
            return _serve_export(args)
        cfg = _config(args, overrides)
        init_distributed(args)
        _show_progress_logs()
        return _run(args, cfg)
    except Preempted as e:  # saved; the scheduler restarts the same command to resume
        print(f"jaxfer: {e}", file=sys.stderr, flush=True)
        return 128 + (e.signum or signal.SIGTERM)
    except _user_errors() as e:  # bad input, paths, disks: the message says it all
        if debug:
            raise
        from jaxfer.errors import JaxferError

        command = next((f"jaxfer {a}" for a in argv if a in COMMANDS), "jaxfer")
        hint = "" if isinstance(e, (JaxferError, OSError)) else " (--debug shows the traceback)"
        raise SystemExit(f"{command}: {type(e).__name__}: {_message(e)}{hint}") from None


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _config(args, overrides):
    """The recipe; for a trained run (eval, predict, export, serve) the config it trained
    with, saved in the workdir, so overrides given at training are not lost."""
    saved = None
    if args.command in RUN_COMMANDS and args.workdir:
        saved = config_lib.load_saved(args.workdir)
    if saved is not None:
        if args.config:
            differ = config_lib.differences(saved, config_lib.load_with_overrides(args.config, overrides))
            if differ:
                print(f"jaxfer {args.command}: using the config the run trained with "
                      f"({config_lib.saved_path(args.workdir)}); it differs from --config in "
                      f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}", file=sys.stderr)
        return config_lib.load_with_overrides(saved, overrides)
    if not args.config:
        hint = f" (or a --workdir holding {config_lib.SAVED})" if args.command in RUN_COMMANDS else ""
        raise ConfigError(f"--config is required{hint}")
    return config_lib.load_with_overrides(args.config, overrides)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Everything the user can fix: our error types (bad config, data, weights, rules,
    checkpoints, workdirs), the operating system's (missing files, permissions, disks),
    and the ValueError/KeyError that library functions raise on values from a recipe."""
    from jaxfer.errors import JaxferError

    return (JaxferError, OSError, ValueError, KeyError)


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
        from jaxfer import data

        if data.source_kind(cfg.data.kind).modality != "text":
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
    from jaxfer import workdir as workdir_lib
    from jaxfer.train import checkpoint
    from jaxfer.transfer import rank

    if not args.candidates:
        raise SystemExit("jaxfer rank: give --candidates SRC [SRC ...] (e.g. recipe recipe:scratch recipe:layers=2)")
    local = args.workdir and workdir_lib.is_local(args.workdir)  # features: a local cache only
    cache = os.path.join(args.workdir, "features") if local else rank.default_cache_dir()
    result = rank.rank(cfg, args.candidates, finetune_steps=args.finetune_steps,
                       max_examples=args.max_examples, cache_dir=cache,
                       log=lambda line: print(line, flush=True))
    print(rank.format_table(result, args.finetune_steps))
    if args.workdir:
        workdir_lib.write_json(workdir_lib.path(args.workdir) / "rank.json", checkpoint.to_jsonable(result))


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

"""A recipe, run: config -> model -> data -> rules/optimizer -> step -> fit -> report.

This is the one place where a config becomes objects; everything it calls is a
library function a user can also call directly (see the README's API tour). The
config layout is the one ``configs/minilm_tweets.py`` documents: ``model``,
``data``, ``rules``, ``optim``, ``train``, ``mesh``.

Restart precedence, fixed: a workdir that holds a checkpoint is resumed; else
the model starts from ``model.source`` (pretrained weights; ``reinit`` names the
parts initialised afresh); a model is never silently trained from scratch.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxfer import baselines, deploy, generation, masks, metrics, objective, optim, param_table, plots, tasks, tree, validate
from jaxfer import workdir as workdir_lib
from jaxfer import data as data_lib
from jaxfer.errors import ConfigError
from jaxfer.train import checkpoint as checkpoint_lib
from jaxfer.train import loop, parallel, runlog, step as step_lib
from jaxfer.train.rng import DEFAULT_DROPOUT_RNG
from jaxfer.train.state import TrainState, cast_frozen
from jaxfer.transfer import caching
from jaxfer.transfer import peft as peft_lib
from jaxfer.transfer import phases as phases_lib
from jaxfer.transfer import probe as probe_lib
from jaxfer.weights.load import HEAD_NAME, Model, init_model, load as load_weights

# ------------------------------------------------------------------- model
def head_for(cfg):
    """The recipe's head: one task, several (``multitask``), or adapting (``adapt``)."""
    validate.head(cfg.task, cfg.model.num_classes)
    return objective.head(cfg)


def build_model(cfg, *, place=None) -> Model:
    """``jaxfer.load(model.source, head=Classifier(...), reinit=model.reinit)``; a sequence
    task (causal_lm, seq2seq) takes the model as it is: its own LM head, no classifier.
    ``model.config`` (when set) names the architecture of a checkpoint without
    ``config.json`` (a ``.pth``: ``{"model_type": "efficientnet_lite", "variant": "lite0"}``).

    ``model.scratch`` (an HF config as a dict, with ``model_type``) instead of a source
    builds that model with random weights, to train from scratch (``model.tokenizer``:
    the folder of its tokenizer): what a recipe does when no pretrained weights exist.
    """
    scratch = cfg.model.get("scratch") or None
    if scratch:
        if cfg.model.get("source"):
            raise ValueError("model.source and model.scratch are both set: load pretrained weights "
                             "or train from scratch, not both")
        config = scratch.to_dict() if hasattr(scratch, "to_dict") else dict(scratch)
        return init_model(config, head_for(cfg), rng=cfg.seed, tokenizer=cfg.model.get("tokenizer") or None,
                          place=place)
    arch = cfg.model.get("config") or None
    return load_weights(cfg.model.source, head=head_for(cfg), reinit=tuple(cfg.model.reinit),
                         rng=cfg.seed, place=place, config=arch.to_dict() if hasattr(arch, "to_dict") else arch)


def tokenizer_for(cfg, model: Model):
    """``model.tokenizer`` of the recipe when set, else the model source's."""
    path = cfg.model.get("tokenizer") or None
    return data_lib.load_tokenizer(path) if path else model.tokenizer()


# -------------------------------------------------------------------- data
@dataclasses.dataclass
class Data:
    train: Any          # resumable iterator of per-process batches
    validation: Any     # re-iterable padded batches (maybe a subset)
    test: Any           # re-iterable padded batches, every example
    label_names: tuple[str, ...] | None
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    sizes: dict[str, int]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # sources; DA: source_test ...
    class_targets: tuple[tuple[int, ...], ...] | None = None  # label words' tokens (text-to-text)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # make_pipeline preprocessing


def dedupe_by(source, column: str):
    """Keep the first example of each distinct ``column`` value (retweets repeat)."""
    if not len(source):
        return source
    _, first = np.unique(source.columns[column].astype(str), return_index=True)
    return source.select(np.sort(first))


def _sources(cfg):
    """``(train, validation, test)`` through the data sources registry (``data.kind``)."""
    d = cfg.data
    if d.kind == "audio":  # WAV paths + transcripts (ctc) or class names (classification)
        ctc = cfg.task == "ctc"
        path = d.path
        if not path and d.get("synthesize"):  # speech made offline by espeak-ng
            from jaxfer.data import espeak

            syn = d.synthesize
            path = espeak.digits_corpus(syn.root, tuple(syn.voices), syn.per_voice, seed=syn.seed)
        src = data_lib.read_audio_csv(path, audio=d.get("audio", "path"), text=d.text if ctc else None,
                                      label=None if ctc else d.label,
                                      label_names=tuple(d.label_names) if d.get("label_names") else None,
                                      sampling_rate=d.sampling_rate, max_seconds=d.max_seconds)
        if ctc:
            src = data_lib.transcribe(src, objective.vocab(cfg), d.get("max_label_length") or None)
        splits = data_lib.split_source(src, tuple(d.splits), seed=cfg.seed)
        return tuple(s.to_arrays() for s in splits) if d.get("in_memory", True) else splits
    if d.kind == "elpv":
        src = data_lib.read_elpv(d.get("path") or None, threshold=d.get("threshold", 0.5),
                                 cell_type=d.get("cell_type") or None)
        return data_lib.split_source(src, tuple(d.splits), seed=cfg.seed)
    task = "regression" if cfg.task == "regression" else "classification"
    kind = data_lib.source_kind(d.kind)
    if kind.splits == "names":  # one source per split name (tfds)
        return data_lib.source_from_config(d, task=task, seed=cfg.seed)
    src = data_lib.read_source(d, task=task)
    if kind.modality == "text":
        src = objective.with_task_columns(cfg, src, kind.make)
    if d.get("dedupe") and hasattr(src, "columns"):  # before splitting: no duplicate across splits
        src = dedupe_by(src, d.text)
    return data_lib.split_source(src, tuple(d.splits), seed=cfg.seed)


def _labels(source) -> np.ndarray | None:
    if hasattr(source, "columns"):
        return source.columns.get("label")
    return getattr(source, "labels", None)


def _preprocessing(cfg, model: Model, cache_dir: str | None = None) -> dict[str, Any]:
    d = cfg.data
    common: dict[str, Any] = {"seed": cfg.seed}
    if tasks.is_sequence(cfg.task) and d.get("target"):
        pass  # tokenised by _text_to_text
    elif data_lib.source_kind(d.kind).modality == "text":  # (a causal LM without targets models the text)
        buckets = d.get("length_buckets", "auto")
        common.update(tokenizer=tokenizer_for(cfg, model), max_length=d.max_length, text=d.text,
                      cache_dir=cache_dir,
                      length_buckets=tuple(buckets) if isinstance(buckets, (tuple, list)) else buckets,
                      **model.text_limits())
    elif d.kind == "audio":
        pass  # read, resampled and padded by the source
    else:  # the model's own preprocessing (checkpoint or family), refined by the recipe
        size, options = data_lib.transform_options(model.preprocessing(), d.image_size,
                                                   dict(d.get("image_options", {}) or {}))
        common.update(image_size=size, image_options=options)
    return common


def build_data(cfg, model: Model, *, cache_dir: str | None = None) -> Data:
    """Sources split, checked against the head (label names, class ids: scanned once),
    the model's vocabulary and position table (text), then batched; tokens cached in
    ``cache_dir`` when given."""
    d = cfg.data
    kind = data_lib.source_kind(d.kind)
    train_src, val_src, test_src = _sources(cfg)
    sizes = {"train": getattr(train_src, "total", len(train_src)),
             "validation": getattr(val_src, "total", len(val_src)),
             "test": getattr(test_src, "total", len(test_src))}
    validate.sizes(sizes, d.batch_size)
    names = getattr(train_src, "label_names", None) or (tuple(d.label_names) if d.get("label_names") else None)
    validate.labels({"train": _labels(train_src), "validation": _labels(val_src),
                     "test": _labels(test_src)}, names, cfg.model.num_classes, cfg.task)
    if d.get("max_eval_examples") and kind.splits == "fractions" and len(val_src) > d.max_eval_examples:
        # a seeded random subset: files are often sorted by class or source
        keep = np.random.default_rng(cfg.seed).permutation(len(val_src))[: d.max_eval_examples]
        val_src = val_src.select(np.sort(keep))
    common = _preprocessing(cfg, model, cache_dir)
    raw = {"train_source": train_src, "test_source": test_src}
    class_targets = None
    if tasks.is_sequence(cfg.task) and d.get("target"):
        (train_src, val_src, test_src), class_targets = _text_to_text(cfg, model, (train_src, val_src, test_src))
    grouping = {"group_by_length": bool(d.get("group_by_length", False))} if "tokenizer" in common else {}
    train = data_lib.make_pipeline(train_src, global_batch_size=d.batch_size, train=True,
                                       mixup_alpha=d.get("mixup_alpha", 0.0),
                                       num_classes=cfg.model.num_classes, **common, **grouping)
    val = data_lib.make_pipeline(val_src, global_batch_size=d.eval_batch_size, train=False, **common)
    test = data_lib.make_pipeline(test_src, global_batch_size=d.eval_batch_size, train=False, **common)
    names = getattr(train_src, "label_names", None) or (tuple(d.label_names) if d.get("label_names") else None)
    data = Data(train, val, test, tuple(names) if names else None, _labels(train_src),
                _labels(test_src), sizes, extra=raw, class_targets=class_targets, options=common)
    return with_target(cfg, model, data) if objective.has_target(cfg) else data


def _text_to_text(cfg, model: Model, splits):
    """Tokenise each split as text-to-text examples (:func:`jaxfer.data.text.tokenize_text_to_text`):
    ``data.target == "label_words"`` makes each example's class name its target (returned
    tokenised per class, for the metrics), else ``data.target`` names the target text column."""
    d = cfg.data
    tok = tokenizer_for(cfg, model)
    eos = objective.eos_id(model)
    names = tuple(d.get("label_names") or ()) or getattr(splits[0], "label_names", None)
    if d.target == "label_words" and not names:
        raise ValueError("data.target='label_words' needs data.label_names")
    limits = model.text_limits()
    positions = limits.get("max_positions")
    if positions is not None and cfg.task == "causal_lm":  # input and target share the positions
        positions -= d.target_length
    max_length = data_lib.fit_max_length(d.max_length, positions)
    out = []
    for src in splits:
        targets = ([names[i] for i in src.columns["label"]] if d.target == "label_words"
                   else [str(t) for t in src.columns[d.target]])
        out.append(data_lib.tokenize_text_to_text(
            src, tok, targets, layout=cfg.task, eos_id=eos, max_length=max_length,
            target_length=d.target_length, text=d.text, prompt=d.get("prompt") or ""))
        data_lib.check_token_ids(out[-1].columns["input_ids"], limits.get("vocab_size"), f"text column {d.text!r}")
    class_targets = None
    if d.target == "label_words":
        class_targets = tuple(tuple(tok(n, add_special_tokens=False)["input_ids"][: d.target_length - 1])
                              for n in names)
        if len(set(class_targets)) != len(class_targets):
            raise ValueError(f"label words {names} do not tokenise to distinct targets: {class_targets}")
    return tuple(out), class_targets


def with_target(cfg, model: Model, data: Data) -> Data:
    """Domain adaptation: test on the target domain; train on source + unlabelled target
    batches (``domain`` 0/1, target labels hidden) unless the method needs no target."""
    tcfg = objective.target_config(cfg)
    train_src, _, test_src = _sources(tcfg)  # the target's validation split is never read
    common = _preprocessing(tcfg, model)
    eval_size = tcfg.data.eval_batch_size
    extra = {"source_test": data.test, "train_source": data.extra["train_source"], "test_source": test_src}
    method = objective.adapt_method(cfg)
    train = data.train
    if method == "adabn":  # target training images, unaugmented, for the batch-norm statistics
        extra["target_eval"] = data_lib.make_pipeline(train_src, global_batch_size=eval_size, train=False,
                                                      **common)
    elif method != "none":
        target_train = data_lib.make_pipeline(train_src, global_batch_size=cfg.adapt.get("batch_size") or
                                              tcfg.data.batch_size, train=True, **common)
        train = data_lib.Mixture({"source": data.train, "target": target_train}, part_key="domain",
                                 hide={"target": ("label",)})
    test = data_lib.make_pipeline(test_src, global_batch_size=eval_size, train=False, **common)
    sizes = {**{f"source_{k}": v for k, v in data.sizes.items()},
             "target_train": len(train_src), "target_test": len(test_src)}
    return dataclasses.replace(data, train=train, test=test, test_labels=_labels(test_src),
                               sizes=sizes, extra=extra)


def token_cache(workdir: str | None) -> str | None:
    """``workdir/cache``, where the tokens of a text run are kept (a local workdir only: on
    a bucket every run tokenises again rather than write outside the path layer)."""
    return os.path.join(workdir, "cache") if workdir and workdir_lib.is_local(workdir) else None


# ---------------------------------------------------------------- training
def trainable_mask(cfg, params) -> Any:
    return masks.trainable_mask(params, _rules(cfg))


def _rules(cfg) -> list[tuple[str, Any]]:
    return peft_lib.rules(cfg, [(p, v) for p, v in cfg.rules])


def build_peft(cfg, model: Model) -> peft_lib.Peft:
    """``transfer.lora/adapters/l2sp/bss/distill``: the params to train (base + LoRA factors,
    adapters, a teacher copy) and what wraps the apply_fn, loss and optimizer."""
    head = head_for(cfg)
    return peft_lib.from_config(cfg, model.params,
                                pooling=getattr(head, "pooling", None) or model.family.default_pooling)


def train_steps(cfg, data: Data | None = None) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` passes over the
    training data (the schedule is sized to it). Without data (a restore template, whose
    schedule length does not matter), ``train.steps`` or 1."""
    t = cfg.train
    if data is None:
        return int(t.steps or 0) or 1
    if problems := validate.run_length(t):
        raise ConfigError("; ".join(problems))
    steps, epochs = int(t.steps or 0), float(t.get("epochs", 0) or 0)
    if not epochs:
        return steps
    it = getattr(data.train, "iterator", data.train)
    if not hasattr(it, "steps_per_epoch"):
        raise ValueError(f"train.epochs needs a training iterator with a known epoch length; this run's "
                         f"({type(it).__name__}) has none: give train.steps")
    return max(1, round(epochs * it.steps_per_epoch))


TRANSFER_DEFAULTS = {"frozen_dropout": True, "cache": "auto", "cache_dir": "", "probe": "",
                     "probe_l2": (1e-4, 1e-3, 1e-2, 1e-1, 1.0), "phases": (), "unfreeze_every": 0}


def transfer_config(cfg) -> dict[str, Any]:
    """``cfg.transfer`` over the defaults (recipes without the section get the defaults)."""
    section = cfg.get("transfer") or {}
    return {**TRANSFER_DEFAULTS, **(section.to_dict() if hasattr(section, "to_dict") else dict(section))}


def build_optimizer(cfg, model: Model, total_steps: int | None = None, regularizer=None):
    num_layers = model.family.num_layers(model.config)
    return optim.from_config(cfg.optim, _rules(cfg), total_steps=total_steps or train_steps(cfg),
                             num_layers=num_layers,
                             layer_pattern=model.family.layer_pattern_for(model.config),
                             regularizer=regularizer)


def explain(cfg, model: Model | None = None, depth: int | None = None) -> param_table.Table:
    """The table ``jaxfer inspect`` prints: what trains, at which lr, and why."""
    if model is None:
        validate.config(cfg)
        model = build_model(cfg)
    params = build_peft(cfg, model).params
    decay = cfg.optim.get("layer_decay") or None
    return param_table.explain(params, _rules(cfg),
                         weight_decay_mask=masks.default_weight_decay_mask(params)
                         if cfg.optim.get("weight_decay") else None,
                         layer_decay=decay,
                         num_layers=model.family.num_layers(model.config) if decay else None,
                         layer_pattern=model.family.layer_pattern_for(model.config) if decay else None,
                         depth=depth)


@dataclasses.dataclass
class Run:
    """Everything a recipe builds before the first step."""
    cfg: Any
    model: Model
    data: Data | None  # None when only the model is needed (predict)
    state: Any
    train_step: Any
    eval_step: Any
    checkpointer: checkpoint_lib.Checkpointer | None
    shard_batch: Any
    trainable: Any
    strategy: Any
    peft: peft_lib.Peft | None = None
    steps: int = 0                          # optimizer steps of the whole run
    cache: caching.Cached | None = None     # what the run computed once (transfer.cache)
    cache_message: str = ""


def compilation_cache(path: str | None) -> None:
    """Keep compiled steps in ``path`` (jax's persistent compilation cache), so a rerun of
    the same recipe on the same machine skips XLA's compile; a cache set before
    (``JAX_COMPILATION_CACHE_DIR``, another call) wins."""
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def _dtype(name: str | None):
    return jax.numpy.dtype(name) if name else None


def setup(cfg, workdir: str | None, *, with_data: bool = True, cache: bool = False) -> Run:
    """Build a run; with ``cache`` (training), compute the frozen part once when that is
    exact (``transfer.cache``, see :mod:`jaxfer.transfer.caching`)."""
    compilation_cache(cfg.train.get("compilation_cache"))
    validate.config(cfg)  # every bad value named at once, before anything loads
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    parallel.check_batch_size(cfg.data.batch_size, mesh)
    parallel.check_batch_size(cfg.data.eval_batch_size, mesh)
    strategy = parallel.Strategy.from_config(cfg.mesh, mesh)
    model = build_model(cfg, place=strategy.param_placer())
    if cfg.model.get("init_from"):
        model = initialised_from(model, cfg.model.init_from)
    peft = build_peft(cfg, model)  # bad transfer.* rules fail here, before data loads
    trainable = trainable_mask(cfg, peft.params)  # bad rules fail here, before data loads
    tcfg = transfer_config(cfg)
    if tcfg["probe"] and tcfg["probe"] not in probe_lib.SOLVERS:
        raise ValueError(f"transfer.probe={tcfg['probe']!r}: choose one of {probe_lib.SOLVERS} or '' (none)")
    if tcfg["probe"] and (why := _cache_blocked(cfg)):
        raise ValueError(f"transfer.probe={tcfg['probe']!r} fits a linear head on cached features, which "
                         f"this recipe cannot use: {why}; set transfer.probe=''")
    data = build_data(cfg, model, cache_dir=token_cache(workdir)) \
        if with_data else None
    steps = train_steps(cfg, data)
    phases = build_phases(cfg, model, steps)
    if phases:
        phase_masks = [masks.trainable_mask(peft.params, p.rules, strict=False) for p in phases]
        trainable = phases_lib.union_trainable(phase_masks)  # what the checkpoints and the cache see
        optimizers = [_phase_optimizer(cfg, model, p, steps, peft.regularizer) for p in phases]
        tx, schedule = optimizers[0]
    else:
        tx, schedule = build_optimizer(cfg, model, steps, peft.regularizer)
    params = peft.params
    if cfg.train.get("frozen_dtype"):  # frozen leaves pass through the step: store them smaller
        params = cast_frozen(params, trainable, _dtype(cfg.train.frozen_dtype))
    state = TrainState.create(params, tx, rng=jax.random.key(cfg.seed), model_state=model.state,
                              copy=False)  # the run keeps no other use for the loaded arrays
    loss_fn, eval_loss_fn = objective.loss_fns(cfg)
    compute_dtype = _dtype(cfg.train.get("compute_dtype"))
    apply_fn = peft.apply_fn(step_lib.model_apply(model))
    cached, message = None, ""
    blocked = _cache_blocked(cfg) if cache and data is not None else None
    if blocked:
        message = f"cache: not used ({blocked})"
    elif cache and data is not None:
        cached, message = caching.prepare(
            apply_fn, {"params": params, **model.state}, trainable, train=data.train,
            validation=data.validation, test=data.test, head=model.module.head if hasattr(model.module, "head")
            else None, layer_pattern=model.family.layer_pattern_for(model.config), head_name=HEAD_NAME,
            directory=_cache_dir(cfg, workdir), frozen_dropout=tcfg["frozen_dropout"], mode=tcfg["cache"],
            config=[_config_json(model.config), cfg.model.to_dict(), list(peft.methods)],
            multi_process=jax.process_count() > 1,
            eager=bool(tcfg["probe"]) and not phases and caching.head_only(trainable, HEAD_NAME))
        if cached is not None:
            apply_fn = cached.apply_fn
            data = dataclasses.replace(data, train=cached.train, validation=cached.validation, test=cached.test)
    state = strategy.place_state(state)
    kw = {"micro_batches": cfg.optim.get("accumulate", 1) or 1, "frozen_dropout": tcfg["frozen_dropout"],
          "adapted": _adapted(peft), "compute_dtype": compute_dtype,
          "dropout_rng": cfg.train.get("dropout_rng") or DEFAULT_DROPOUT_RNG}
    train_loss = peft.train_loss(loss_fn)
    if phases:
        train_step = _phased_step(strategy, state, phases, optimizers, phase_masks, apply_fn, train_loss, kw)
    else:
        train_step = strategy.train_step(apply_fn, train_loss, tx, trainable, lr_schedule=schedule, **kw)
    eval_step = strategy.eval_step(objective.eval_apply(cfg, apply_fn, model), eval_loss_fn,
                                   compute_dtype=compute_dtype, **objective.eval_step_kwargs(cfg))
    ckpt = checkpointer(cfg, workdir, trainable, strategy) if workdir else None
    return Run(cfg, model, data, state, train_step, eval_step, ckpt, strategy.shard_batch,
               trainable, strategy, peft=peft, steps=steps, cache=cached, cache_message=message)


def _cache_blocked(cfg) -> str | None:
    """Why a run computes nothing once whatever its rules (``None``: it may)."""
    if cfg.train.get("compute_dtype"):
        return f"train.compute_dtype={cfg.train.compute_dtype!r}: the cache would be float32, the steps not"
    if tasks.is_sequence(cfg.task) or cfg.task != "classification":
        return f"the {cfg.task} task trains through the whole model here"
    if objective.task_list(cfg) is not None:
        return "several tasks (multitask) share the model"
    if objective.adapt_method(cfg) != "none" or objective.has_target(cfg):
        return (f"domain adaptation (adapt.method={objective.adapt_method(cfg)!r}): target-domain batches, "
                "and a source-domain test beside the target's")
    return None


def _adapted(peft: peft_lib.Peft) -> tuple[str, ...]:
    """Frozen kernels/modules that train through LoRA factors or adapters (not inference mode)."""
    paths = tuple(p for p, _ in peft.lora.targets) if peft.lora is not None else ()
    return paths + (tuple(t[0] for t in peft.adapters.targets) if peft.adapters is not None else ())


def _cache_dir(cfg, workdir: str | None) -> str | None:
    tcfg = transfer_config(cfg)
    return tcfg["cache_dir"] or token_cache(workdir)  # (a local workdir only, like the tokens)


# ------------------------------------------------------------------ phases
def build_phases(cfg, model: Model, steps: int) -> list[phases_lib.Phase]:
    """``transfer.phases`` (explicit) or ``transfer.unfreeze_every`` (gradual unfreezing
    toward ``rules``); ``[]`` for a one-phase run."""
    tcfg = transfer_config(cfg)
    if tcfg["phases"] and tcfg["unfreeze_every"]:
        raise ValueError("give transfer.phases or transfer.unfreeze_every, not both")
    if tcfg["phases"]:
        return phases_lib.from_specs([dict(p) for p in tcfg["phases"]], steps, default_lr=cfg.optim.lr)
    if tcfg["unfreeze_every"]:
        return phases_lib.unfreezing(_rules(cfg), every=int(tcfg["unfreeze_every"]), total_steps=steps,
                                     num_layers=model.family.num_layers(model.config),
                                     layer_pattern=model.family.layer_pattern_for(model.config),
                                     backbone=model.family.base_model_prefix, lr=cfg.optim.lr)
    return []


def _phase_optimizer(cfg, model: Model, phase: phases_lib.Phase, steps: int, regularizer=None):
    own = phase.schedule == "phase"
    return optim.from_config({**cfg.optim.to_dict(), "lr": phase.lr}, phase.rules,
                             total_steps=phase.steps if own else steps, start_step=phase.start if own else 0,
                             num_layers=model.family.num_layers(model.config),
                             layer_pattern=model.family.layer_pattern_for(model.config), strict=False,
                             regularizer=regularizer)


def _phased_step(strategy, state, phases, optimizers, phase_masks, apply_fn, loss_fn, kw):
    """One compiled step per phase (each with its optimizer state's shardings)."""
    if not isinstance(strategy, parallel.JitStrategy) or jax.process_count() > 1:
        raise ValueError("training phases run with mesh.strategy='jit' in one process")
    steps, places = [], []
    for (tx, schedule), mask in zip(optimizers, phase_masks):
        template = state.replace(opt_state=jax.eval_shape(tx.init, state.params))
        sharding = parallel.state_shardings(template, strategy.mesh, strategy.rules,
                                            min_fsdp_size=strategy.min_fsdp_size)
        strategy.state_sharding = sharding  # read by train_step when it compiles this phase
        steps.append(strategy.train_step(apply_fn, loss_fn, tx, mask, lr_schedule=schedule, **kw))
        places.append(lambda s, sharding=sharding: jax.device_put(s, sharding))
    return phases_lib.PhasedStep(phases, [tx for tx, _ in optimizers], steps, places=places)


def _config_json(config) -> Any:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def initialised_from(model: Model, workdir: str) -> Model:
    """``model`` with the params of the run in ``workdir`` (its best checkpoint, else its latest;
    that run's own ``config.json`` rebuilds its state): ``model.init_from``, to continue a trained
    model on new data with new rules and optimizer (sequential transfer: voices A, then voice B).
    The params must have the same paths and shapes; any difference is an error naming it."""
    import ml_collections

    from jaxfer import tree

    path = workdir_lib.path(workdir) / "config.json"
    if not workdir_lib.exists(path):
        raise FileNotFoundError(f"model.init_from={workdir!r}: no config.json there (not a jaxfer run workdir)")
    previous = ml_collections.ConfigDict(workdir_lib.read_json(path))
    params = restore_trained(previous, workdir, with_data=False).state.params
    ours = {p: np.shape(v) for p, v in tree.flatten(model.params).items()}
    theirs = {p: np.shape(v) for p, v in tree.flatten(params).items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
        raise ValueError(f"model.init_from={workdir!r}: its params differ from this model's: {diff}")
    from jaxfer.weights.strict import LoadReport

    report = LoadReport(source=str(workdir), format="jaxfer run", loaded=list(theirs))
    return model.replace(variables={**model.variables, "params": params}, report=report)


def checkpointer(cfg, workdir: str, trainable, strategy) -> checkpoint_lib.Checkpointer:
    """The run's checkpoints: latest ``keep`` + best ``keep_best``; trainable-only if asked."""
    ckpt = checkpoint_lib.Checkpointer(
        workdir, keep=cfg.train.keep, keep_best=cfg.train.keep_best,
        best_metric=cfg.train.best_metric, best_mode=cfg.train.get("best_mode", "max"),
        trainable=trainable if cfg.train.trainable_only_checkpoints else None)
    return strategy.wrap_checkpointer(ckpt)


def restore_trained(cfg, workdir: str, *, with_data: bool = True) -> Run:
    """A run whose state is the workdir's best checkpoint (or latest, without evaluations)."""
    run = setup(cfg, None, with_data=with_data)
    ckpt = checkpointer(cfg, workdir, run.trainable, run.strategy)
    if ckpt.latest_step() is None:
        raise checkpoint_lib.CheckpointError(f"no checkpoint in {workdir!r}: train first "
                                             f"(jaxfer train --config ... --workdir {workdir})")
    step = ckpt.best_step() if ckpt.best_step() is not None else ckpt.latest_step()
    state, _, _ = ckpt.restore(restore_template(run, run.state, step), step)
    return dataclasses.replace(run, state=state, checkpointer=ckpt)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def train(cfg, workdir: str | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run a recipe to the end and report validation/test metrics and the baseline.

    The workdir is locked from the start (a second run on it fails at once)
    until ``test_metrics.json`` is written.
    """
    validate.config(cfg)  # before the workdir is created
    lock = loop.hold_lock(workdir) if workdir else None
    try:
        return _train(cfg, workdir, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, workdir: str | None, progress: bool) -> dict[str, Any]:
    t0 = time.time()
    run = setup(cfg, workdir, cache=True)
    _log(str(run.model.report))
    _log(str(explain(cfg, run.model, depth=4)))  # per layer; `jaxfer inspect` shows every leaf
    for line in run.peft.methods:
        _log(f"transfer: {line}")
    _log(f"data: {run.data.sizes}; {run.steps} steps")
    if workdir and not tasks.is_sequence(cfg.task) and cfg.data.kind != "audio":  # what predict/serve/export need: tokenizer, labels
        deploy.save_spec(workdir, cfg, run.model, run.data.label_names, cfg.task)
    if run.cache_message:
        _log(run.cache_message)
    metrics_fn = objective.metrics_fn(cfg, model=run.model, data=run.data)
    state = run.state
    latest = run.checkpointer.latest_step() if run.checkpointer is not None else None
    if transfer_config(cfg)["probe"]:
        if run.cache is not None and run.cache.kind == "features":
            return _train_probe(cfg, run, workdir, t0)
        if latest is None:  # LP-FT: the fine-tuning below starts from a fitted head
            state = state.replace(params=_set_head(state.params, _fit_head(cfg, run, workdir)))
    if latest is not None:
        state = restore_template(run, state, latest)  # its phase's optimizer state
    budget = float(cfg.train.get("max_seconds", 0) or 0)
    state, history = loop.fit(
        state, run.train_step, run.data.train, steps=run.steps,
        max_seconds=max(budget - (time.time() - t0), 1e-9) if budget else None,
        eval_step=run.eval_step, eval_batches=run.data.validation,
        eval_every=cfg.train.eval_every, task=cfg.task, label_names=run.data.label_names,
        workdir=workdir, checkpointer=run.checkpointer, checkpoint_every=cfg.train.checkpoint_every,
        log_every=cfg.train.log_every, best_metric=cfg.train.best_metric,
        best_mode=cfg.train.get("best_mode", "max"), patience=cfg.train.patience,
        max_nonfinite_skips=cfg.train.get("max_nonfinite_skips", 5),
        strict_resume=cfg.train.get("strict_resume", False), config=cfg.to_dict(),
        shard_batch=run.shard_batch, progress=progress, metrics_fn=metrics_fn,
        hooks=(run.cache.timer(),) if run.cache is not None else ())
    trained_steps = loop.current_step(state)
    if run.cache is not None:
        _log(run.cache.speedup_message())
    if any(r.get("reason") == "time_budget" for r in history if r.get("split") == "stop"):
        _log(f"time budget: train.max_seconds={budget:g} s spent at step {trained_steps} of {run.steps}; "
             "checkpointed there (run again to continue)")
    if run.checkpointer is not None and (best := run.checkpointer.best_step()) is not None:
        state, _, _ = run.checkpointer.restore(restore_template(run, state, best), best)  # best by validation
    state = adapted(run, state)
    test = loop.evaluate(state, run.eval_step, run.data.test, task=cfg.task,
                         label_names=run.data.label_names, shard_batch=run.shard_batch, metrics_fn=metrics_fn)
    result = {"test": test, "seconds": time.time() - t0, "steps": trained_steps,
              "tested_step": loop.current_step(state)}
    if "source_test" in run.data.extra:  # domain adaptation: "test" is the target domain's
        result["source_test"] = loop.evaluate(state, run.eval_step, run.data.extra["source_test"],
                                              task=cfg.task, label_names=run.data.label_names,
                                              shard_batch=run.shard_batch)
    return _finish(cfg, run, workdir, result, state)


def _finish(cfg, run: Run, workdir: str | None, result: dict[str, Any], state) -> dict[str, Any]:
    """Add the baselines, print the result, write ``test_metrics.json`` (and, for images, the
    figures of the tested ``state``)."""
    test = result["test"]
    classes = cfg.task == "classification" or run.data.class_targets is not None  # label words: classes too
    task_rows = objective.task_list(cfg)
    if (classes and task_rows is None
            and run.data.train_labels is not None and run.data.test_labels is not None):
        result["majority_baseline"] = metrics.majority_baseline(
            run.data.train_labels, run.data.test_labels, cfg.model.num_classes)
        result["baseline"] = non_transfer_baseline(cfg, run.data)
    elif task_rows is not None and _input_kind(cfg) == "text" and "train_source" in run.data.extra:
        result["baseline"] = {"tasks": baselines.task_baselines(
            task_rows, run.data.extra["train_source"], run.data.extra["test_source"],
            text=cfg.data.get("text", "text"), seed=cfg.seed)}
    _log(format_result(result))
    if workdir and jax.process_index() == 0:
        workdir_lib.write_json(workdir_lib.path(workdir) / "test_metrics.json",
                               checkpoint_lib.to_jsonable(result))
        if ("image_size" in run.data.options and "confusion_matrix" in test and task_rows is None
                and jax.process_count() == 1 and run.cache is None):  # (a cached eval step needs cached rows)
            write_image_figures(run, state, workdir, test)
    return result


def write_image_figures(run: Run, state, workdir: str, test: dict[str, Any], num_images: int = 24) -> None:
    """``confusion_matrix.png``, ``test_predictions.png`` (a seeded sample of test images
    with predicted and true labels) and, when the test images are files, ``test_images.txt``
    and ``test_labels.txt`` (line-aligned: ``jaxfer predict --input test_images.txt``)."""
    names = run.data.label_names or tuple(str(i) for i in range(run.cfg.model.num_classes))
    _png(workdir, "confusion_matrix.png", plots.confusion_matrix_png, test["confusion_matrix"], names,
                               title=f"test: accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}")
    src = run.data.extra["test_source"]
    pick = np.sort(np.random.default_rng(run.cfg.seed).permutation(len(src))[:num_images])
    subset = (src.select(pick) if hasattr(src, "select")  # tfds: read the few examples into arrays
              else data_lib.from_arrays(data_lib.stack([src[int(i)] for i in pick])))
    batches = data_lib.make_pipeline(subset, global_batch_size=run.cfg.data.eval_batch_size, train=False,
                                     process_index=0, process_count=1, **run.data.options)
    out = loop.predict(state, run.eval_step, batches, shard_batch=run.shard_batch)
    logits = out["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    predicted = probs.argmax(-1)
    _png(workdir, "test_predictions.png", plots.prediction_grid_png,
                              [subset[i]["image"] for i in range(len(subset))], out["label"], predicted, names,
                              probabilities=probs.max(-1), title="test images: predicted / true")
    if hasattr(src, "paths"):
        folder = workdir_lib.path(workdir)
        workdir_lib.write_text(folder / "test_images.txt", "".join(os.path.abspath(p) + "\n" for p in src.paths))
        workdir_lib.write_text(folder / "test_labels.txt", "".join(names[int(y)] + "\n" for y in _labels(src)))


def _png(workdir: str, name: str, draw, *args, **kwargs) -> None:
    """``draw(file, *args, **kwargs)`` (a :mod:`jaxfer.plots` figure) into ``workdir/name``
    through the workdir's path layer."""
    buffer = io.BytesIO()
    draw(buffer, *args, **kwargs)
    workdir_lib.write_bytes(workdir_lib.path(workdir) / name, buffer.getvalue())


def _set_head(params, head: dict[str, np.ndarray]):
    """``params`` with the head's kernel and bias replaced (same placement)."""
    flat = tree.flatten(params)
    out = dict(flat)
    for name, value in head.items():
        paths = [p for p in flat if p.startswith(HEAD_NAME + "/") and p.endswith("/" + name)]
        if len(paths) != 1:
            raise ValueError(f"the head needs exactly one {name!r} under {HEAD_NAME!r}; found {paths}")
        old = flat[paths[0]]
        if tuple(old.shape) != tuple(value.shape):
            raise ValueError(f"{paths[0]}: probe gives shape {value.shape}, the head holds {old.shape}")
        out[paths[0]] = jax.device_put(np.asarray(value, old.dtype), old.sharding)
    return tree.unflatten(out)


def _fit_head(cfg, run: Run, workdir: str | None, feats=None) -> dict[str, np.ndarray]:
    """The head fitted by ``transfer.probe`` on cached pooled features (computed here when
    the run has none), ``l2`` chosen on validation; logged."""
    tcfg = transfer_config(cfg)
    train, validation = run.data.train, run.data.validation
    if feats is None:
        t1 = time.time()
        feats = caching.head_features(step_lib.model_apply(run.model), run.model.variables, train=train,
                                      validation=validation,
                                      head_name=HEAD_NAME, directory=_cache_dir(cfg, workdir),
                                      config=[_config_json(run.model.config), cfg.model.to_dict()])
        how = "reused" if all(f.reused for f in feats.values()) else f"computed in {time.time() - t1:.0f} s"
        _log(f"probe features: the backbone's pooled output for {len(feats['train']):,} train and "
             f"{len(feats['validation']):,} validation examples ({how})")
    t1 = time.time()
    head, l2, scores = caching.fit_probe(tcfg["probe"], feats, train=train, validation=validation,
                                         num_classes=cfg.model.num_classes, l2_grid=tuple(tcfg["probe_l2"]),
                                         metric=cfg.train.best_metric)
    metric = cfg.train.best_metric
    tried = ", ".join(f"{s['l2']:g}: {s[metric]:.4f}" for s in scores)
    then = "" if run.cache is not None and run.cache.kind == "features" else "; fine-tuning starts from it (LP-FT)"
    _log(f"probe: {tcfg['probe']} on cached features, l2 {l2:g} chosen by validation {metric} ({tried}); "
         f"{time.time() - t1:.1f} s{then}")
    return head


def restore_template(run: Run, state, step: int):
    """``state`` shaped like a checkpoint of ``step`` (its phase's optimizer state)."""
    if isinstance(run.train_step, phases_lib.PhasedStep):
        return run.train_step.template(state, step)
    return state


def _train_probe(cfg, run: Run, workdir: str | None, t0: float) -> dict[str, Any]:
    """``transfer.probe`` with only the head trainable: the head by a full-batch solver on
    the cached features, and nothing else."""
    head = _fit_head(cfg, run, workdir, feats=run.cache.features)
    state = run.state.replace(params=_set_head(run.state.params, head), step=run.state.step + 1)
    val = loop.evaluate(state, run.eval_step, run.data.validation, task=cfg.task,
                        label_names=run.data.label_names, shard_batch=run.shard_batch)
    if run.checkpointer is not None:
        run.checkpointer.save(1, state, config=cfg.to_dict(), metrics=val, force=True)
        run.checkpointer.close()
    log = runlog.RunLog(workdir, None, cfg.to_dict())  # the loop's log files, for one evaluation
    log.write({"step": 1, "split": "eval", **checkpoint_lib.to_jsonable(val)})
    log.close()
    test = loop.evaluate(state, run.eval_step, run.data.test, task=cfg.task,
                         label_names=run.data.label_names, shard_batch=run.shard_batch)
    result = {"test": test, "validation": val, "seconds": time.time() - t0, "steps": 1, "tested_step": 1}
    return _finish(cfg, run, workdir, result, state)


def evaluate(cfg, workdir: str, split: str = "test") -> dict[str, Any]:
    """Metrics of the workdir's best (or latest) checkpoint on a split."""
    run = restore_trained(cfg, workdir)
    batches = {"test": run.data.test, "validation": run.data.validation}[split]
    return loop.evaluate(adapted(run, run.state), run.eval_step, batches, task=cfg.task,
                         label_names=run.data.label_names, shard_batch=run.shard_batch,
                         metrics_fn=objective.metrics_fn(cfg, model=run.model, data=run.data))


def adapted(run: Run, state):
    """The trained state as it is tested: for ``adapt.method = "adabn"``, with every batch
    norm's statistics re-estimated on the target training images (full batches, no
    augmentation); otherwise unchanged."""
    if objective.adapt_method(run.cfg) != "adabn" or run.data is None:
        return state
    from jaxfer.transfer import adapt

    variables = {"params": state.params, **state.model_state}
    batches = (run.shard_batch({k: v for k, v in b.items() if k != "mask"})
               for b in run.data.extra["target_eval"] if b["mask"].all())
    apply_fn = run.peft.apply_fn(step_lib.model_apply(run.model))
    return state.replace(model_state=adapt.adabn(apply_fn, variables, batches))


def predict_texts(cfg, workdir: str | None, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Class probabilities for raw texts, from the workdir's best/latest checkpoint
    (without a workdir: the freshly loaded model, head untrained)."""
    if workdir:
        run = restore_trained(cfg, workdir, with_data=False)
        model, params = run.model, run.peft.inference_params(run.state.params)
    else:
        validate.config(cfg)
        model = build_model(cfg)
        params = model.params
    if jax.process_count() == 1:
        params = jax.device_get(params)
    if tasks.is_sequence(cfg.task):
        return generate_texts(cfg, model, params, texts)
    max_length = data_lib.fit_max_length(cfg.data.max_length, model.text_limits().get("max_positions"))
    batch = data_lib.tokenize_texts(list(texts), model.tokenizer(), max_length)
    logits = np.asarray(model.apply(params, **batch)["logits"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    names = tuple(cfg.data.get("label_names") or range(cfg.model.num_classes))
    return [{"text": t, "label": str(names[int(p.argmax())]),
             "probs": {str(n): round(float(q), 4) for n, q in zip(names, p)}}
            for t, p in zip(texts, probs)]


def generate_texts(cfg, model: Model, params, texts: Sequence[str]) -> list[dict[str, Any]]:
    """What a text-to-text model writes for each of ``texts`` (the recipe's prompt and
    ``generate`` settings; greedy for ``data.target_length`` tokens without them); with
    label words, ``label`` is the class it names (None for anything else)."""
    tok = tokenizer_for(cfg, model)
    eos = objective.eos_id(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(eos)
    prompt = cfg.data.get("prompt") or ""
    batch = data_lib.tokenize_texts([prompt + t for t in texts], tok, cfg.data.max_length)
    settings = objective.generate_settings(cfg, model) or generation.settings_for(model.config,
                                                                                  cfg.data.target_length)
    out = generation.generate(model, batch["input_ids"], batch["attention_mask"], params=params,
                              **dataclasses.asdict(settings))["tokens"]
    names = tuple(cfg.data.get("label_names") or ())
    rows = []
    for t, row in zip(texts, out):
        words = tok.decode(list(metrics.sequence(row, eos)), skip_special_tokens=True).strip()
        label = {"label": words if words in names else None} if cfg.data.get("target") == "label_words" else {}
        rows.append({"text": t, "generated": words, **label})
    return rows


# --------------------------------------------------------------- reporting
def non_transfer_baseline(cfg, data: Data) -> dict[str, Any]:
    """A model fitted from nothing on the same split (:mod:`jaxfer.baselines`)."""
    return baselines.non_transfer(_input_kind(cfg), data.extra["train_source"], data.extra["test_source"],
                                  num_classes=cfg.model.num_classes, text=cfg.data.get("text", "text"),
                                  label_names=data.label_names, seed=cfg.seed)


def _input_kind(cfg) -> str:
    """What the baselines read: ``"text"``, ``"image"`` or the data kind."""
    d = cfg.data
    return "text" if d.kind in ("csv", "jsonl") else "image" if d.get("image_size") else d.kind


def _baseline_line(label: str, base: dict[str, Any]) -> str:
    """``label`` and a baseline's numbers (classification or regression), or why it was skipped."""
    if "skipped" in base:
        return f"{label} {base['skipped']}"
    if "macro_f1" in base:
        return f"{label} accuracy {base['accuracy']:.4f}  macro-F1 {base['macro_f1']:.4f}  ({base['name']}, same split)"
    return f"{label} R^2 {base['r2']:.4f}  RMSE {base['rmse']:.4f}  ({base['name']}, same split)"


def format_result(result: dict[str, Any]) -> str:
    test = result["test"]
    if "tasks" in test:  # multitask: each task's report
        from jaxfer.transfer import multitask

        lines = [f"test:\n{multitask.format_report(test)}"]
        for name, base in (result.get("baseline") or {}).get("tasks", {}).items():
            lines.append(_baseline_line(f"no-transfer baseline [{name}]:", base))
            warning = baselines.verdict(test["tasks"].get(name, {}), base, what=f"the model's {name!r} head")
            if warning:
                lines.append(warning)
        return "\n".join(lines)
    lines = [f"test: {metrics.format_report(test)}"]
    if "source_test" in result:  # domain adaptation: "test" is the target domain's
        src = result["source_test"]
        lines.append(f"source-domain test: accuracy {src['accuracy']:.4f}  macro-F1 {src['macro_f1']:.4f}"
                     if "accuracy" in src else f"source-domain test: {src}")
    base = result.get("majority_baseline")
    if base is not None:
        lines.append(f"majority-class baseline: accuracy {base['accuracy']:.4f}  "
                     f"macro-F1 {base['macro_f1']:.4f}")
        lines.append(_baseline_line("no-transfer baseline:   ", result.get("baseline") or baselines.skipped("not computed")))
        lines.append(f"model:                   accuracy {test['accuracy']:.4f}  "
                     f"macro-F1 {test['macro_f1']:.4f}  (checkpoint of step {result['tested_step']} "
                     f"of {result['steps']}, best on validation; {result['seconds']:.0f} s in all)")
        warning = baselines.verdict(test, result.get("baseline") or {})
        if warning:
            lines.append(warning)
    return "\n".join(lines)

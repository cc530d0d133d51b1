"""What freezing saves: jaxfer's train step vs the PyTorch way, same BERT, same batch, CPU.

Three settings, each on a freshly initialised BERT-ish classifier:

* ``full``: every parameter trains;
* ``frozen-half``: embeddings and the bottom half of the encoder layers frozen;
* ``head-only``: only the classifier trains (linear probe).

jaxfer: ``make_train_step`` with a ``trainable`` mask and
``optax.partition(adamw / set_to_zero)``: gradients only for the trainable
partition, no optimizer state for frozen leaves. PyTorch: the usual recipe,
``transformers.BertForSequenceClassification`` with ``requires_grad_(False)``
on the frozen modules and ``torch.optim.AdamW`` over the parameters that still
require grad.

Reported per setting: XLA flops of the compiled step (``cost_analysis``; every
op) and PyTorch's ``FlopCounterMode`` count (matmuls and convolutions only, so
the two flop columns are comparable in ratio, not in absolute value), median
step time over ``--steps`` steps after ``--warmup``, optimizer-state bytes, and
the jax/torch time ratio.

    python benchmarks/frozen_step.py               # ~1-2 min on 2 CPU cores
    python benchmarks/frozen_step.py --layers 2 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import os

# torch's OpenMP threads otherwise spin after each op and steal the cores from
# the jax step that runs next in this process (the steps are interleaved)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import sys

import jax
import numpy as np
import optax

from jaxfer import tree
from jaxfer.models.bert import BertModel
from jaxfer.models.heads import Classifier, TaskModel
from jaxfer.train import TrainState, linen_apply, losses, make_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SETTINGS = ("full", "frozen-half", "head-only")


def bert_config(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                max_position_embeddings=max(512, args.seq), type_vocab_size=2,
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, hidden_act="gelu",
                layer_norm_eps=1e-12, initializer_range=0.02)


def frozen_prefixes(setting: str, layers: int) -> list[str]:
    """Path prefixes (jaxfer layout, '/'-separated) that a setting freezes."""
    if setting == "full":
        return []
    if setting == "frozen-half":
        return ["bert/embeddings"] + [f"bert/encoder/layer/{i}/" for i in range(layers // 2)]
    return ["bert/"]  # head-only: everything but the classifier


def make_batch(args) -> dict:
    r = np.random.default_rng(0)
    ids = r.integers(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "label": r.integers(0, args.classes, size=args.batch).astype(np.int32),
            "mask": np.ones(args.batch, np.float32)}


# ---------------------------------------------------------------------- jax
def bench_jax(setting: str, args, batch: dict) -> dict:
    model = TaskModel(BertModel(bert_config(args)), Classifier(args.classes, pooling="pooler", dropout_rate=0.1))
    params = jax.jit(model.init)(jax.random.key(0), input_ids=batch["input_ids"][:1],
                                 attention_mask=batch["attention_mask"][:1])["params"]
    frozen = frozen_prefixes(setting, args.layers)
    trainable = tree.map_with_path(lambda p, _: not any(p.startswith(f) for f in frozen), params)
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
    tx = optax.partition({"train": optax.adamw(3e-5, weight_decay=0.01), "frozen": optax.set_to_zero()}, labels)
    state = TrainState.create(params, tx, rng=0)
    step = make_train_step(linen_apply(model), losses.softmax_cross_entropy(), tx, trainable)
    run_one, info = harness.compiled_step(step, state, jax.device_put(batch))
    return {**info, "run_one": run_one, "opt_bytes": tree.nbytes(state.opt_state),
            "trainable": sum(np.size(x) for x, t in zip(jax.tree_util.tree_leaves(params),
                                                        jax.tree_util.tree_leaves(trainable)) if t)}


# -------------------------------------------------------------------- torch
def bench_torch(setting: str, args, batch: dict) -> dict:
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=args.classes, **bert_config(args))
    model = transformers.BertForSequenceClassification(config).train()
    if setting == "frozen-half":
        model.bert.embeddings.requires_grad_(False)
        for layer in model.bert.encoder.layer[: args.layers // 2]:
            layer.requires_grad_(False)
    elif setting == "head-only":
        model.bert.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.01)
    inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.from_numpy(batch["label"]).long()

    def run_one():
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()

    run_one()  # creates the optimizer state, so the counter sees a steady-state step
    with FlopCounterMode(display=False) as counter:
        run_one()
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return {"flops": float(counter.get_total_flops()), "run_one": run_one, "opt_bytes": opt_bytes,
            "trainable": sum(p.numel() for p in params)}


# --------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)

    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    print(f"# {datetime.date.today()}  {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch threads {args.threads}")
    print(f"# BERT layers={args.layers} hidden={args.hidden} heads={args.heads} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}; median of {args.steps} steps after {args.warmup} warmup, all steps interleaved\n")
    header = ("| setting | trainable params | jax GFLOP (XLA) | torch GFLOP (matmul) | jax ms/step | "
              "torch ms/step | jax/torch time | jax opt state MB | torch opt state MB |")
    rows = {}
    for setting in SETTINGS:
        rows[setting] = (bench_jax(setting, args, batch), None if args.no_torch else bench_torch(setting, args, batch))
    # every step of every setting and framework interleaved: a busy machine slows them all alike
    runs = [r for pair in rows.values() for r in pair if r is not None]
    runners = [harness.Runner(str(i), r["run_one"]) for i, r in enumerate(runs)]
    harness.interleave(runners, warmup=args.warmup, steps=args.steps)
    for r, runner in zip(runs, runners):
        r["seconds"] = runner.seconds
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for setting, (j, t) in rows.items():
        cells = [setting, f"{j['trainable']:,}", f"{j['flops'] / 1e9:.1f}",
                 "-" if t is None else f"{t['flops'] / 1e9:.1f}", f"{j['seconds'] * 1e3:.0f}",
                 "-" if t is None else f"{t['seconds'] * 1e3:.0f}",
                 "-" if t is None else f"{j['seconds'] / t['seconds']:.2f}", f"{j['opt_bytes'] / 2**20:.3g}",
                 "-" if t is None else f"{t['opt_bytes'] / 2**20:.3g}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    full = rows["full"][0]
    print("\njax relative to its own full fine-tune: " + ", ".join(
        f"{s}: flops x{rows[s][0]['flops'] / full['flops']:.2f}, time x{rows[s][0]['seconds'] / full['seconds']:.2f}"
        for s in SETTINGS[1:]))
    if not args.no_torch:
        tf = rows["full"][1]
        print("torch relative to its own full fine-tune: " + ", ".join(
            f"{s}: flops x{rows[s][1]['flops'] / tf['flops']:.2f}, time x{rows[s][1]['seconds'] / tf['seconds']:.2f}"
            for s in SETTINGS[1:]))
    print("jax compile seconds: " + ", ".join(f"{s} {rows[s][0]['compile_s']:.1f}" for s in SETTINGS))


if __name__ == "__main__":
    main()

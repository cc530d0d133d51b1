"""One training step, jaxfer against the PyTorch way: every family, every mode, one process.

For each family (:mod:`families`: MiniLM-size BERT, ViT-S/16, ResNet-50,
EfficientNet-Lite0) and mode (full / top2 / head / lora / prefix), jaxfer's step
is ``make_train_step`` with rules -> ``optim.build(adamw)`` (frozen leaves get no
gradient and no optimizer state) and the PyTorch way's is the same architecture
with ``requires_grad_(False)`` on the frozen modules, ``torch.optim.AdamW`` over
what still requires grad (LoRA: ``peft``), ``loss.backward()``. All steps of a
family, and one ``n x n`` matmul per framework, are timed interleaved
(:func:`harness.interleave`).

Columns: *GFLOP* -- jax: XLA's ``cost_analysis`` of the compiled step (every op,
optimizer included); torch: ``FlopCounterMode`` (matmuls and convolutions only).
*x matmul* -- achieved GFLOP/s over that framework's own matmul GFLOP/s in this
run (on an accelerator also MFU: over the chip's dense bf16 peak). *ms* --
median step time (``--clock cpu``: median process CPU time / threads, the
steadier number on a shared machine). *opt MB* -- optimizer state after a step.
*RSS MB* -- peak resident memory of a fresh process that builds and runs only
that step (``--rss``). *compile s* -- jax ``lower().compile()``.

    python benchmarks/steps.py                                # every family and mode
    python benchmarks/steps.py --families bert --modes full,top2,head
    python benchmarks/steps.py --families bert --bert-hidden 768 --bert-layers 12 --bert-seq 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin between interleaved steps

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402
import harness  # noqa: E402
import machine  # noqa: E402

from jaxfer import masks, optim, tree  # noqa: E402
from jaxfer.train import TrainState, linen_apply, losses, make_train_step  # noqa: E402
from jaxfer.train.rng import DEFAULT_DROPOUT_RNG, DROPOUT_RNGS  # noqa: E402
from jaxfer.transfer import lora, prefix  # noqa: E402

LR = 5e-5


class NotExact(RuntimeError):
    """The mode does not apply to this model size (its row is left out, with the reason)."""


# ---------------------------------------------------------------------- jax
def jax_step(case: families.Case, mode: str, dtype: str = "float32",
             dropout_rng: str = DEFAULT_DROPOUT_RNG) -> harness.Runner:
    variables = jax.jit(case.model.init)(jax.random.key(0), **case.init_inputs)
    params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    batch = dict(case.batch)
    apply_fn = linen_apply(case.model)
    rules = case.rules(mode)
    if mode == "lora":
        params, spec = lora.add(params, [(case.lora_targets, lora.LoRA(8, alpha=16))], rng=0)
        apply_fn = lora.wrap(apply_fn, spec)
    trainable = masks.trainable_mask(params, rules)
    if mode == "prefix":
        plan = prefix.plan(case.model, variables, trainable, batch, layer_pattern=case.layer_pattern)
        if not plan.exact:
            raise NotExact(plan.describe())
        boundary = jax.jit(prefix.boundary_fn(case.model, plan.module))(variables, batch)
        batch[prefix.BOUNDARY_KEY] = np.asarray(boundary)
        apply_fn = prefix.cached_apply(case.model, plan.module)
    tx = optim.build(optax.adamw(LR, weight_decay=0.01), rules)
    state = TrainState.create(params, tx, rng=0, model_state=model_state)
    kwargs = {"compute_dtype": jnp.dtype(dtype)} if dtype != "float32" else {}
    step = make_train_step(apply_fn, losses.softmax_cross_entropy(), tx, trainable, dropout_rng=dropout_rng,
                           **kwargs)
    run, info = harness.compiled_step(step, state, jax.device_put(batch))
    n_trainable = sum(int(np.size(x)) for x, t in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(trainable)) if t)
    return harness.Runner(f"jax {case.name} {mode}", run, info={
        **info, "opt_bytes": tree.nbytes(state.opt_state), "trainable": n_trainable})


# -------------------------------------------------------------------- torch
def torch_step(case: families.Case, mode: str, dtype: str = "float32") -> harness.Runner:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    tc = case.torch()
    model = tc.model
    if mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=tc.lora_targets))
        for m in tc.head:
            m.requires_grad_(True)
    elif mode != "full":
        model.requires_grad_(False)
        keep = list(tc.head) if mode == "head" else [*tc.blocks[-2:], *tc.above, *tc.head]
        for m in keep:
            for sub in (m if isinstance(m, list) else [m]):
                sub.requires_grad_(True)
    dev = machine.torch_device()
    model.to(dev)
    inputs = {k: v.to(dev) for k, v in tc.inputs.items()}
    labels = tc.labels.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    autocast = (torch.autocast(dev, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = tc.loss(model(**inputs), labels)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    run()  # the optimizer state exists from here on, so the counter sees a steady-state step
    with FlopCounterMode(display=False) as counter:
        run()
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return harness.Runner(f"torch {case.name} {mode}", run, info={
        "flops": float(counter.get_total_flops()), "opt_bytes": opt_bytes,
        "trainable": sum(p.numel() for p in params)})


# ------------------------------------------------------------------- tables
def build_case(name: str, args) -> families.Case:
    sizes = {k[len(name) + 1:]: v for k, v in vars(args).items() if k.startswith(name + "_") and v is not None}
    return families.FAMILIES[name](**sizes)


def modes_for(case: families.Case, modes) -> list[str]:
    return [m for m in modes if not (m == "lora" and case.lora_targets is None)]


def family_table(name: str, args) -> str:
    case = build_case(name, args)
    modes = modes_for(case, args.modes)
    threads = args.threads
    rows: dict[str, tuple[harness.Runner, harness.Runner | None]] = {}
    notes = []
    for mode in modes:
        try:
            j = jax_step(case, mode, args.dtype, args.dropout_rng)
        except NotExact as e:  # e.g. top2 of a 2-layer model: nothing below to cache
            notes.append(f"{mode}: not run, {e}")
            continue
        t = None if args.no_torch else torch_step(case, mode, args.dtype)
        rows[mode] = (j, t)
    on_cpu = jax.devices()[0].platform == "cpu"
    n = args.matmul_n or (2048 if on_cpu else 8192)
    mm = {k: harness.Runner(f"{k} matmul", f) for k, f in
          machine.matmul_runners(n, args.dtype, torch_too=not args.no_torch).items()}
    runners = [r for pair in rows.values() for r in pair if r is not None] + list(mm.values())
    harness.interleave(runners, warmup=args.warmup, steps=args.steps)

    def secs(r):
        return r.cpu_seconds / threads if args.clock == "cpu" else r.seconds

    rate = {k: 2 * n**3 / secs(r) for k, r in mm.items()}
    peak = {"jax": machine.jax_peak(), "torch": None if args.no_torch else machine.torch_peak()}
    if args.rss:
        for mode, (j, t) in rows.items():
            for fw, r in (("jax", j), ("torch", t)):
                if r is not None:
                    r.info["rss"] = harness.child_peak_rss(__file__, [*args.argv, "--child", name, mode, fw])

    def frac(r, fw):
        if r is None:
            return "-"
        achieved = r.info["flops"] / secs(r)
        text = f"{achieved / rate[fw]:.2f}"
        return text + (f" ({achieved / peak[fw]:.0%} MFU)" if peak[fw] else "")

    header = ["mode", "trainable", "jax GFLOP", "torch GFLOP", "jax ms", "torch ms", "jax/torch",
              "jax ex/s", "torch ex/s", "jax x matmul", "torch x matmul", "jax opt MB", "torch opt MB",
              "jax RSS MB", "torch RSS MB", "jax compile s"]
    body = []
    for mode, (j, t) in rows.items():
        g = (lambda r, k, f=".3g", s=1.0: "-" if r is None or r.info.get(k) is None else format(r.info[k] * s, f))
        body.append([mode, f"{j.info['trainable']:,}", g(j, "flops", ".1f", 1e-9), g(t, "flops", ".1f", 1e-9),
                     f"{secs(j) * 1e3:.0f}", "-" if t is None else f"{secs(t) * 1e3:.0f}",
                     "-" if t is None else f"**{secs(j) / secs(t):.2f}**",
                     f"{case.examples / secs(j):.0f}", "-" if t is None else f"{case.examples / secs(t):.0f}",
                     frac(j, "jax"), frac(t, "torch"), g(j, "opt_bytes", ".3g", 2**-20),
                     g(t, "opt_bytes", ".3g", 2**-20), g(j, "rss", ".0f"), g(t, "rss", ".0f"),
                     f"{j.info['compile_s']:.1f}"])
    title = (f"### {case.label}, {args.dtype}; median of {args.steps} interleaved steps after {args.warmup}"
             f" ({'CPU time / ' + str(threads) + ' threads' if args.clock == 'cpu' else 'wall time'})")
    foot = (f"jaxfer dropout bits: {args.dropout_rng}; host memory reused (both): "
            f"{'yes' if args.reuse_host_memory else 'no'}; matmul {n}x{n}x{n} {args.dtype} in this run: jax {rate['jax'] / 1e9:.0f} GFLOP/s"
            + ("" if args.no_torch else f", torch {rate['torch'] / 1e9:.0f} GFLOP/s"))
    if "prefix" in rows:
        foot += "; prefix: torch column = its top2 step (no cache in the PyTorch way)"
    return "\n".join([title, "", harness.table(header, body), "", foot, *notes])


def child(args) -> None:
    """Build and run one step in this fresh process; print its peak RSS."""
    name, mode, fw = args.child
    case = build_case(name, args)
    r = jax_step(case, mode, args.dtype, args.dropout_rng) if fw == "jax" else torch_step(case, mode, args.dtype)
    for _ in range(3):
        r.run()
    print(json.dumps({"peak_rss_mb": harness.peak_rss_mb()}))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="bert,vit,resnet,efficientnet")
    p.add_argument("--modes", default=",".join(families.MODES))
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="call jaxfer.reuse_host_memory() first (as the jaxfer command does); it holds for "
                   "the whole process, so for both frameworks")
    p.add_argument("--dropout-rng", default=DEFAULT_DROPOUT_RNG, choices=DROPOUT_RNGS,
                   help="jaxfer's dropout bits (make_train_step(dropout_rng=...))")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (CPU)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="peak RSS of each step in its own process (slow: builds everything again)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    for name, fn in families.FAMILIES.items():  # --bert-hidden 768, --vit-batch-size 8, ...
        import inspect

        for arg, param in inspect.signature(fn).parameters.items():
            kind = type(param.default) if not isinstance(param.default, tuple) else None
            p.add_argument(f"--{name}-{arg.replace('_', '-')}", dest=f"{name}_{arg}", default=None,
                           type=kind or (lambda s: tuple(int(x) for x in s.split(","))))
    return p


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--rss"]
    args.modes = [m for m in args.modes.split(",") if m]
    if args.reuse_host_memory:
        from jaxfer.train.hostmem import reuse_host_memory

        args.reuse_host_memory = reuse_host_memory()
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    print(machine.describe())
    for name in [f for f in args.families.split(",") if f]:
        print()
        print(family_table(name, args), flush=True)


if __name__ == "__main__":
    main()

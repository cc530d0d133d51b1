"""PEFT and regularisers from a recipe's ``transfer`` section: the one call ``experiment.py`` makes.

Keys (every one off by default, so a recipe without them trains as before)::

    transfer.lora.rules = (("bert/encoder/layer/*/**/kernel", 8, 16.0),)  # (pattern, rank, alpha); () = off
    transfer.lora.dropout = 0.0
    transfer.adapters.size = 0          # > 0: bottleneck adapters of that size
    transfer.adapters.kind = "houlsby"  # after attention and MLP blocks; "pfeiffer": after the MLP only
    transfer.l2sp.alpha = 0.0           # > 0: L2-SP toward the pretrained weights (replaces weight decay)
    transfer.l2sp.beta = 0.0            #   plain L2 on the new leaves ...
    transfer.l2sp.new = ("classifier/**",)  # ... which these patterns name
    transfer.bss.weight = 0.0           # > 0: batch spectral shrinkage on the pooled features
    transfer.bss.k = 1
    transfer.distill.weight = 0.0       # > 0: distillation against the pretrained model (LwF)
    transfer.distill.key = "features"   # pooled features, or an output name ("logits")
    transfer.distill.kind = "mse"       # or "kl"
    transfer.distill.temperature = 1.0

The recipe's ``rules`` must train what these add: ``lora/**`` for LoRA
factors, ``adapters/**`` for adapters (:mod:`jaxfer.transfer.presets`); a
frozen teacher copy (distillation without LoRA/adapters) is frozen here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from jaxfer import masks, tree
from jaxfer.errors import ConfigError
from jaxfer.train.losses import LossFn
from jaxfer.transfer import adapters as adapters_lib, lora as lora_lib, regularizers as reg

PyTree = Any
DEFAULTS = {
    "lora": {"rules": (), "dropout": 0.0},
    "adapters": {"size": 0, "kind": "houlsby"},
    "l2sp": {"alpha": 0.0, "beta": 0.0, "new": ("classifier/**",)},
    "bss": {"weight": 0.0, "k": 1},
    "distill": {"weight": 0.0, "key": "features", "kind": "mse", "temperature": 1.0},
}
_ADAPTER_KINDS = {"houlsby": adapters_lib.houlsby, "pfeiffer": adapters_lib.pfeiffer}


@dataclasses.dataclass
class Peft:
    """What a recipe's ``transfer`` section adds to a run.

    ``params``: the params to train (the base, plus LoRA factors, adapters or a
    teacher copy); ``apply_fn(base_apply_fn)``: the run's apply_fn (train and eval alike);
    ``train_loss(loss_fn)``: the training loss with its terms (evaluate with the
    plain one); ``regularizer``: an optax transformation to put before the
    optimizer (L2-SP), or None; ``methods``: one line per active method, for the log.
    """

    params: PyTree
    lora: lora_lib.Spec | None = None
    adapters: adapters_lib.Spec | None = None
    regularizer: optax.GradientTransformation | None = None
    terms: tuple = ()
    teacher_copy: bool = False
    distill: bool = False
    methods: tuple[str, ...] = ()

    def apply_fn(self, base_apply_fn: Callable) -> Callable:
        fn = base_apply_fn
        if self.adapters is not None:
            fn = adapters_lib.wrap(fn, self.adapters)
        if self.lora is not None:
            fn = lora_lib.wrap(fn, self.lora)
        if self.distill:
            teacher = None if self.teacher_copy else _base
            fn = reg.with_teacher(fn, base_apply_fn, teacher)
        return fn

    def train_loss(self, loss_fn: LossFn) -> LossFn:
        return reg.add_terms(loss_fn, *self.terms) if self.terms else loss_fn

    def inference_params(self, params: PyTree) -> PyTree:
        """Trained params a plain ``model.apply`` runs: LoRA merged, the teacher dropped.

        (``model.apply`` would silently ignore extra params: Flax does not check.)
        Adapters cannot be merged into the model's weights: a run with them predicts
        through :meth:`apply_fn`.
        """
        if self.adapters is not None:
            raise ConfigError("a run with transfer.adapters has no plain-model form (adapters are not "
                             "linear); predict through its apply_fn (experiment.setup(...).eval_step)")
        params = {k: v for k, v in params.items() if k != reg.TEACHER}
        return lora_lib.merge(params, self.lora) if self.lora is not None else params


@contextlib.contextmanager
def _named(key: str):
    """Library errors (a non-kernel target, a bad rank) as :class:`ConfigError` naming ``key``;
    rules matching nothing keep their own error, which names the nearest paths."""
    try:
        yield
    except (tree.NoMatchError, masks.ShadowedRuleError):
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from e


def _base(params: PyTree) -> dict:
    return adapters_lib.base_params(lora_lib.base_params(params))


def section(cfg: Any) -> dict[str, dict[str, Any]]:
    """``cfg.transfer``'s PEFT keys over :data:`DEFAULTS` (other ``transfer`` keys are not ours)."""
    t = cfg.get("transfer") or {}
    out = {}
    for name, defaults in DEFAULTS.items():
        given = t.get(name) or {}
        given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
        unknown = set(given) - set(defaults)
        if unknown:
            raise ConfigError(f"unknown key(s) transfer.{name}.{sorted(unknown)[0]}; known: {sorted(defaults)}")
        out[name] = {**defaults, **given}
    return out


def _teacher_copy(s: dict) -> bool:
    return bool(s["distill"]["weight"]) and not s["lora"]["rules"] and not s["adapters"]["size"]


def rules(cfg: Any, run_rules: masks.Rules) -> list:
    """The run's rules, with ``("teacher/**", None)`` first when a teacher copy is held."""
    return [(f"{reg.TEACHER}/**", None), *run_rules] if _teacher_copy(section(cfg)) else list(run_rules)


def from_config(cfg: Any, params: PyTree, *, pooling: str = "mean") -> Peft:
    """Build :class:`Peft` from ``cfg.transfer`` (see the module doc) over loaded ``params``.

    Rules and patterns are checked here, against ``params``, before any data is
    read: a LoRA rule or an ``l2sp.new`` pattern matching nothing is an error.
    """
    s = section(cfg)
    seed = int(cfg.get("seed", 0) or 0)
    out = Peft(params)
    if s["adapters"]["size"]:
        kind = s["adapters"]["kind"]
        if kind not in _ADAPTER_KINDS:
            raise ConfigError(f"transfer.adapters.kind must be one of {sorted(_ADAPTER_KINDS)}, got {kind!r}")
        with _named("transfer.adapters"):
            out.params, out.adapters = adapters_lib.add(
                out.params, _ADAPTER_KINDS[kind](int(s["adapters"]["size"])), rng=seed + 1)
        out.methods += (f"adapters: {kind}, size {s['adapters']['size']}, on {len(out.adapters.targets)} modules",)
    if s["lora"]["rules"]:
        rules = []
        for rule in s["lora"]["rules"]:
            if len(rule) != 3:
                raise ConfigError(f"transfer.lora.rules holds (pattern, rank, alpha) triples, got {rule!r}")
            pattern, rank, alpha = rule
            with _named("transfer.lora"):
                rules.append((pattern, lora_lib.LoRA(int(rank), float(alpha), float(s["lora"]["dropout"]))))
        with _named("transfer.lora.rules"):
            out.params, out.lora = lora_lib.add(out.params, rules, rng=seed + 2)
        out.methods += (f"LoRA on {len(out.lora.targets)} kernels: {tree.count(out.params['lora'])} parameters",)
    l2 = s["l2sp"]
    if l2["alpha"] or l2["beta"]:
        weight_decay = (cfg.get("optim") or {}).get("weight_decay", 0.0)
        if weight_decay:
            raise ConfigError(f"transfer.l2sp replaces weight decay (toward zero): set optim.weight_decay=0 "
                             f"(it is {weight_decay})")
        new = tuple(l2["new"])
        if new:
            masks.glob(*new).check(tree.paths(params))
        out.regularizer = reg.l2_sp(float(l2["alpha"]), float(l2["beta"]), new=new or None)
        out.methods += (f"L2-SP: alpha {l2['alpha']} toward the pretrained weights, beta {l2['beta']} on {new}",)
    if s["bss"]["weight"]:
        out.terms += ((float(s["bss"]["weight"]), reg.bss(int(s["bss"]["k"]), pooling)),)
        out.methods += (f"BSS: weight {s['bss']['weight']}, k {s['bss']['k']}",)
    d = s["distill"]
    if d["weight"]:
        out.distill = True
        out.teacher_copy = _teacher_copy(s)
        if out.teacher_copy:
            out.params = reg.add_teacher(out.params)
        term = reg.distillation(d["key"], kind=d["kind"], temperature=float(d["temperature"]), pooling=pooling)
        out.terms += ((float(d["weight"]), term),)
        out.methods += (f"distillation: weight {d['weight']} on {d['key']} ({d['kind']}) against the "
                        + ("pretrained copy" if out.teacher_copy else "base model"),)
    return out

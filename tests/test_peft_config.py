"""transfer.* config keys -> the params, apply_fn, loss and optimizer a run uses (jaxfer.transfer.peft)."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxfer import masks, tree
from jaxfer.errors import ConfigError
from jaxfer.train import linen_apply, losses
from jaxfer.transfer import peft
from tests import stand_ins


def cfg(**transfer):
    c = ml_collections.ConfigDict({"seed": 0, "optim": {"weight_decay": 0.0}})
    c.transfer = ml_collections.ConfigDict(transfer)
    return c


def test_no_transfer_section_changes_nothing():
    _, params, _ = stand_ins.tiny_bert_task()
    p = peft.from_config(ml_collections.ConfigDict({"seed": 0}), params)
    assert p.params is params and p.methods == () and p.regularizer is None
    f = object()
    assert p.apply_fn(f) is f and p.train_loss(f) is f


def test_lora_and_distillation_from_config_share_the_base_as_teacher():
    model, params, batch = stand_ins.tiny_bert_task()
    c = cfg(lora={"rules": (("bert/**/query/kernel", 2, 4.0),)}, distill={"weight": 1.0},
            bss={"weight": 0.1})
    p = peft.from_config(c, params)
    assert set(p.params) == {"bert", "classifier", "lora"} and not p.teacher_copy
    assert peft.rules(c, [("**", 1.0)]) == [("**", 1.0)]
    apply_fn = p.apply_fn(linen_apply(model))
    outputs, _ = apply_fn({"params": p.params}, batch, train=True, rng=jax.random.key(0))
    assert "teacher" in outputs
    losses_, _ = p.train_loss(losses.softmax_cross_entropy())(outputs, batch)
    plain, _ = losses.softmax_cross_entropy()(outputs, batch)
    assert np.all(np.asarray(losses_) > np.asarray(plain))  # BSS adds; distillation is 0 at the start
    merged = p.inference_params(p.params)
    assert "lora" not in merged and set(merged) == {"bert", "classifier"}


def test_distillation_without_lora_holds_a_frozen_teacher_copy():
    _, params, _ = stand_ins.tiny_bert_task()
    c = cfg(distill={"weight": 1.0})
    p = peft.from_config(c, params)
    assert p.teacher_copy and "teacher" in p.params
    rules = peft.rules(c, [("**", 1.0)])
    trainable = tree.flatten(masks.trainable_mask(p.params, rules))
    assert not any(v for k, v in trainable.items() if k.startswith("teacher/"))
    assert "teacher" not in p.inference_params(p.params)


def test_config_mistakes_are_transfer_config_errors():
    _, params, _ = stand_ins.tiny_bert_task()
    with pytest.raises(ConfigError, match="transfer.lora.ranks"):
        peft.from_config(cfg(lora={"ranks": 8}), params)
    with pytest.raises(ConfigError, match="triples"):
        peft.from_config(cfg(lora={"rules": (("**/query/kernel", 8),)}), params)
    with pytest.raises(ConfigError, match="rank"):
        peft.from_config(cfg(lora={"rules": (("**/query/kernel", 0, 8),)}), params)
    with pytest.raises(ConfigError, match="pfeifer"):
        peft.from_config(cfg(adapters={"size": 4, "kind": "pfeifer"}), params)
    with pytest.raises(tree.NoMatchError, match="classifier"):
        peft.from_config(cfg(l2sp={"alpha": 0.1, "new": ("clasifier/**",)}), params)
    bad = cfg(l2sp={"alpha": 0.1})
    bad.optim.weight_decay = 0.01
    with pytest.raises(ConfigError, match="weight decay"):
        peft.from_config(bad, params)
    p = peft.from_config(cfg(adapters={"size": 4}), params)
    with pytest.raises(ConfigError, match="not linear"):
        p.inference_params(p.params)
